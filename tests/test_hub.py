"""Hugging Face Hub ids as checkpoint paths (`checkpoints.hub`).

Nothing here reaches the network: the Hub is a cache laid out as the Hub
client lays it out (`fake_hub`), read under HF_HUB_OFFLINE, or a server on
127.0.0.1 that gives the Hub's error answers; wherever neither is meant, the
endpoint is a closed port on 127.0.0.1.
"""

import functools
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import transformers

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import convert
from tsformer_jax import export
from tsformer_jax import predict
from tsformer_jax import train
from tsformer_jax.checkpoints import hub
from tsformer_jax.datasets import synthetic_motion

from checkpoint_sources import hf_timesformer
from checkpoint_sources import run_convert
from checkpoint_sources import save_hf
from conftest import apply
from conftest import hf_logits
from conftest import random_clips
from conftest import tiny_config
from conftest import write_class_folders
import fake_hub
from fake_hub import COMMIT
from fake_hub import cache_repo
from fake_hub import closed_port_url

REPO = 'owner/name'
BIN_REPO = 'owner/name-bin'  # pytorch_model.bin only, as older repos.
NO_CONFIG_REPO = 'owner/weights-only'
# tiny_config('divided').model as a Hugging Face TimesformerConfig.
TINY_HF = dict(num_frames=4, image_size=32, patch_size=8, hidden_size=64,
               num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, num_labels=10)
NO_PACKAGE = ('{}: no such file or directory; read as a Hugging Face Hub id, '
              "it needs huggingface_hub: pip install 'tsformer_jax[hub]'.")


def _tree_equal(a, b):
  return jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.fixture(scope='module')
def hf_model(tmp_path_factory):
  """A random HF TimeSformer, saved twice: safetensors and .bin weights."""
  model = hf_timesformer(0, **TINY_HF)
  root = tmp_path_factory.mktemp('hf')
  save_hf(model, root / 'bin', 'bin')
  return model, save_hf(model, root / 'safetensors', 'safetensors')


@pytest.fixture(scope='module')
def cache(hf_model, tmp_path_factory):
  """A Hub cache holding REPO, BIN_REPO and NO_CONFIG_REPO."""
  local = hf_model[1]
  cache = tmp_path_factory.mktemp('hub')
  cache_repo(cache, REPO, [local / 'config.json', local / 'model.safetensors'])
  bin_dir = local.parent / 'bin'
  cache_repo(cache, BIN_REPO,
             [bin_dir / 'config.json', bin_dir / 'pytorch_model.bin'])
  cache_repo(cache, NO_CONFIG_REPO, [local / 'model.safetensors'])
  return cache


@pytest.fixture
def use_hub(monkeypatch):
  """`use_hub(cache, offline=True, endpoint=None)`: `fake_hub.point_at`."""
  return functools.partial(fake_hub.point_at, monkeypatch)


@pytest.fixture
def hub_server(use_hub, tmp_path):
  """A server on 127.0.0.1 answering every request with the Hub's error
  `(status, X-Error-Code)` that the test sets: `hub_server(status, code)`;
  returns its URL."""
  answer = {}

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):
      body = json.dumps({'error': answer['code']}).encode()
      self.send_response(answer['status'])
      self.send_header('X-Error-Code', answer['code'])
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  threading.Thread(target=server.serve_forever, args=(0.05,),
                   daemon=True).start()
  url = f'http://127.0.0.1:{server.server_address[1]}'

  def serve(status, code):
    answer.update(status=status, code=code)
    use_hub(tmp_path / 'empty', offline=False, endpoint=url)
    return url
  yield serve
  server.shutdown()
  server.server_close()


# ----------------------------------------------------------------------------
# Ids and paths

@pytest.mark.parametrize('path,expected', [
    ('facebook/timesformer-base-finetuned-k400', True),
    ('owner/name@main', True),
    ('owner/name@refs/pr/1', True),
    (f'owner/name@{COMMIT}', True),
    ('Owner_1/name.v2', True),
    ('name', False),  # The Hub's legacy bare ids: likelier a missing file.
    ('/abs/owner/name', False),
    ('./owner/name', False),
    ('../owner/name', False),
    ('~/name', False),
    ('a/b/c', False),
    ('owner/model.pyth', False),
    ('owner/vit.npz', False),
    ('owner/name.safetensors', False),
    ('a--b/name', False),
    ('owner/name.', False),
    ('-owner/name', False),
    ('owner/name@', False),
    ('', False),
])
def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch, path, expected):
  monkeypatch.chdir(tmp_path)
  assert hub.is_hub_id(path) is expected


def test_an_existing_path_is_never_a_hub_id(tmp_path, monkeypatch, hf_model):
  monkeypatch.chdir(tmp_path)
  shutil.copytree(hf_model[1], tmp_path / 'owner' / 'name')
  assert not hub.is_hub_id('owner/name')
  assert not hub.is_hub_id(pathlib.Path('owner/name'))
  # Without huggingface_hub, which reading an id would need.
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
  assert hub.resolve('owner/name') == 'owner/name'
  _, params = tsformer_jax.load_checkpoint('owner/name')
  assert _tree_equal(params, tsformer_jax.load_checkpoint(hf_model[1])[1])
  assert checkpoints.detect_format('owner/name') == 'hf_timesformer'


# ----------------------------------------------------------------------------
# Reading ids from the cache, offline

@pytest.mark.parametrize('path', [REPO, f'{REPO}@main', f'{REPO}@{COMMIT}',
                                  BIN_REPO])
def test_load_checkpoint_reads_a_hub_id_from_the_cache_offline(
    use_hub, cache, hf_model, path):
  use_hub(cache)
  model, local = hf_model
  assert hub.resolve(path) == str(
      cache / f'models--{path.split("@")[0].replace("/", "--")}' /
      'snapshots' / COMMIT)
  assert checkpoints.detect_format(path) == 'hf_timesformer'
  config, params = tsformer_jax.load_checkpoint(path)
  local_config, local_params = tsformer_jax.load_checkpoint(local)
  assert config.to_dict() == local_config.to_dict()
  assert _tree_equal(params, local_params)
  clips = random_clips(config)
  np.testing.assert_allclose(
      apply(tsformer_jax.create_model(config), params, clips),
      hf_logits(model, clips), atol=1e-4)


def test_convert_reads_a_hub_id(use_hub, cache, hf_model, tmp_path):
  use_hub(cache)
  run_convert(REPO, tmp_path / 'out')
  _, params = tsformer_jax.load_checkpoint(str(tmp_path / 'out'))
  assert _tree_equal(params, tsformer_jax.load_checkpoint(hf_model[1])[1])


def test_init_from_path_takes_a_hub_id(use_hub, cache, hf_model):
  use_hub(cache)
  config = tiny_config('divided')
  config.init_from.path = REPO
  params = checkpoints.init_params_from(config, jax.random.key(0))
  _, expected = tsformer_jax.load_checkpoint(hf_model[1], config)
  assert _tree_equal(params, expected)


# ----------------------------------------------------------------------------
# Failures: one line each

def _convert_error(capsys, tmp_path, src):
  """The error line of `python -m tsformer_jax.convert SRC OUT`."""
  capsys.readouterr()
  assert cli.call(convert.main, ['convert', src, str(tmp_path / 'out')]) == 1
  errors = [line for line in capsys.readouterr().err.splitlines()
            if line.startswith('convert: error: ')]
  assert len(errors) == 1
  return errors[0].removeprefix('convert: error: ')


def test_without_huggingface_hub_a_hub_id_fails_in_one_line(
    monkeypatch, capsys, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
  for path in (REPO, f'{REPO}@main'):
    with pytest.raises(ValueError) as e:
      tsformer_jax.load_checkpoint(path)
    assert str(e.value) == NO_PACKAGE.format(path)
  assert _convert_error(capsys, tmp_path, REPO) == NO_PACKAGE.format(REPO)


@pytest.mark.parametrize('revision', [None, 'v1.0'])
def test_offline_with_an_empty_cache_fails_in_one_line(
    use_hub, capsys, tmp_path, revision):
  empty = tmp_path / 'empty-cache'
  use_hub(empty)
  path = REPO + (f'@{revision}' if revision else '')
  command = f'hf download {REPO}' + (f' --revision {revision}'
                                     if revision else '')
  expected = (f'{path}: no such file or directory, nor in the Hugging Face '
              f'cache ({empty}), and HF_HUB_OFFLINE is set: download it once '
              f'online ({command}) or pass a local path.')
  with pytest.raises(FileNotFoundError) as e:
    tsformer_jax.load_checkpoint(path)
  assert str(e.value) == expected
  assert _convert_error(capsys, tmp_path, path) == expected


def test_unreachable_hub_with_an_empty_cache_fails_in_one_line(
    use_hub, tmp_path):
  empty, endpoint = tmp_path / 'empty-cache', closed_port_url()
  use_hub(empty, offline=False, endpoint=endpoint)
  with pytest.raises(FileNotFoundError) as e:
    tsformer_jax.load_checkpoint(REPO)
  assert str(e.value) == (
      f'{REPO}: no such file or directory, nor in the Hugging Face cache '
      f'({empty}), and the Hugging Face Hub cannot be reached at {endpoint}: '
      f'connect and retry (hf download {REPO}), or pass a local path.')


@pytest.mark.parametrize('path,status,code,expected', [
    (REPO, 404, 'RepoNotFound',
     '{path}: no such file or directory, nor a Hugging Face Hub repo at {url} '
     '(a private one needs a login: hf auth login).'),
    (REPO, 401, 'RepoNotFound',
     '{path}: no such file or directory, nor a Hugging Face Hub repo at {url} '
     '(a private one needs a login: hf auth login).'),
    (f'{REPO}@v9', 404, 'RevisionNotFound',
     "{path}: the Hugging Face Hub repo owner/name has no revision 'v9'."),
    (REPO, 403, 'GatedRepo',
     '{path}: a gated Hugging Face Hub repo: accept its terms at '
     '{url}/owner/name, then log in (hf auth login).'),
], ids=['missing', 'unauthorised', 'revision', 'gated'])
def test_hub_refusals_fail_in_one_line(hub_server, path, status, code,
                                       expected):
  url = hub_server(status, code)
  with pytest.raises(FileNotFoundError) as e:
    tsformer_jax.load_checkpoint(path)
  assert str(e.value) == expected.format(path=path, url=url)


def test_a_hub_repo_without_config_json_fails_in_one_line(use_hub, cache):
  use_hub(cache)
  with pytest.raises(ValueError) as e:
    tsformer_jax.load_checkpoint(NO_CONFIG_REPO)
  assert str(e.value) == (
      f'{NO_CONFIG_REPO}: a Hugging Face Hub repo without config.json; the '
      'Hub repos read here are Transformers TimeSformer and ViT models.')


# ----------------------------------------------------------------------------
# The environment variables themselves, in a fresh process

@pytest.mark.slow
def test_convert_honours_the_hub_environment_variables(cache, hf_model,
                                                       tmp_path):
  endpoint = closed_port_url()

  def run(hub_cache, out):
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE='1',
               HF_ENDPOINT=endpoint)
    env.pop('HF_HOME', None)
    return subprocess.run(
        [sys.executable, '-m', 'tsformer_jax.convert', REPO, str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        check=False)

  done = run(cache, tmp_path / 'out')
  assert done.returncode == 0, done.stderr
  _, params = tsformer_jax.load_checkpoint(str(tmp_path / 'out'))
  assert _tree_equal(params, tsformer_jax.load_checkpoint(hf_model[1])[1])

  empty = tmp_path / 'empty-cache'
  failed = run(empty, tmp_path / 'out2')
  assert failed.returncode == 1
  assert failed.stderr.splitlines()[-1] == (
      f'convert: error: {REPO}: no such file or directory, nor in the Hugging '
      f'Face cache ({empty}), and HF_HUB_OFFLINE is set: download it once '
      f'online (hf download {REPO}) or pass a local path.')
  assert not (tmp_path / 'out2').exists()


# ----------------------------------------------------------------------------
# The README's path: Hub id -> convert -> fine-tune on a folder -> predict ->
# export to Hugging Face


@pytest.mark.slow
def test_hub_to_folder_to_pytorch(use_hub, cache, tmp_path, capsys):
  use_hub(cache)
  run_convert(REPO, tmp_path / 'pretrained')
  data = write_class_folders(tmp_path / 'videos', train=16, val=8)
  config = config_lib.get_config('divided', 'demo,folder')
  config.data.data_dir = str(data)
  config.model.update(num_classes=2, num_frames=4)
  config.init_from.path = str(tmp_path / 'pretrained')
  config.update(num_train_steps=4, batch_size=8, eval_batch_size=8,
                checkpoint_every_steps=4)
  workdir = tmp_path / 'work'
  train.train_and_evaluate(config, str(workdir))
  names = sorted(synthetic_motion.CLASSES)  # The class folders.

  capsys.readouterr()
  video = next((data / 'val').rglob('*.mp4'))
  assert cli.call(predict.main, ['predict', f'--checkpoint={workdir}/'
                                 'checkpoints', str(video), '--json']) == 0
  top = json.loads(capsys.readouterr().out)['videos'][0]['top_k']
  assert sorted(t['label'] for t in top) == names

  assert cli.call(export.main, ['export', f'{workdir}/checkpoints',
                                str(tmp_path / 'hf')]) == 0
  exported = transformers.TimesformerForVideoClassification.from_pretrained(
      tmp_path / 'hf').eval()
  assert list(exported.config.id2label.values()) == names
  ours_config, params = tsformer_jax.load_checkpoint(f'{workdir}/checkpoints')
  clips = random_clips(ours_config)
  np.testing.assert_allclose(
      apply(tsformer_jax.create_model(ours_config), params, clips),
      hf_logits(exported, clips), atol=1e-4)
