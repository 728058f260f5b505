"""A Hugging Face Hub without the network: a cache laid out as the Hub client
lays it out, and an endpoint where nothing listens.

huggingface_hub reads its environment variables once, at import: in the
test process `point_at` sets `huggingface_hub.constants` (as its own tests
do) and the variables, for subprocesses.
"""

import hashlib
import shutil
import socket

from huggingface_hub import constants

COMMIT = hashlib.sha1(b'tsformer_jax').hexdigest()


def closed_port_url():
  """An endpoint on 127.0.0.1 where nothing listens: connections refused."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return f'http://127.0.0.1:{s.getsockname()[1]}'


def cache_repo(cache, repo, files):
  """`files` as the Hub client caches a download of `repo`'s main branch:
  blobs named by content hash, a snapshot of links to them, refs/main."""
  root = cache / f'models--{repo.replace("/", "--")}'
  snapshot = root / 'snapshots' / COMMIT
  snapshot.mkdir(parents=True)
  (root / 'blobs').mkdir()
  for file in files:
    blob = hashlib.sha256(file.read_bytes()).hexdigest()
    shutil.copyfile(file, root / 'blobs' / blob)
    (snapshot / file.name).symlink_to(f'../../blobs/{blob}')
  (root / 'refs').mkdir()
  (root / 'refs' / 'main').write_text(COMMIT)  # The client writes no '\n'.
  return snapshot


def point_at(monkeypatch, cache, offline=True, endpoint=None):
  """huggingface_hub reads `cache` and asks `endpoint` (by default a closed
  port on 127.0.0.1), offline or not, until the test ends."""
  endpoint = endpoint or closed_port_url()
  for name, value in (('HF_HUB_CACHE', str(cache)),
                      ('HF_HUB_OFFLINE', offline), ('ENDPOINT', endpoint)):
    monkeypatch.setattr(constants, name, value)
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1' if offline else '0')
  monkeypatch.setenv('HF_ENDPOINT', endpoint)
