"""Hugging Face Hub ids as checkpoint paths: `facebook/timesformer-base-
finetuned-k400`, or `owner/name@revision` (a branch, tag or commit).

`resolve` turns an id into the local directory of its snapshot in the Hub
client's cache, downloading what is missing. `huggingface_hub` is optional
(`pip install 'tsformer_jax[hub]'`) and imported only for an id; it keeps its
cache where `HF_HUB_CACHE` (or `HF_HOME`) says, reads only that cache under
`HF_HUB_OFFLINE=1`, and asks the server `HF_ENDPOINT` names. A path that
exists is never an id.
"""

from __future__ import annotations

import logging
import os
import re

_LOG = logging.getLogger(__name__)

# The Hub's rule for a model id (huggingface_hub.utils.validate_repo_id):
# owner/name of letters, digits, '-', '_' and '.', neither starting nor
# ending with '-' or '.', without '--' or '..'. A bare `name` (the Hub's
# legacy ids) is not taken: it is far likelier a mistyped local file.
_PART = r'(?![.-])(?![\w.-]*(?:--|\.\.))[\w.-]{1,96}(?<![.-])'
_ID = re.compile(rf'(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[^\s@]+))?',
                 re.ASCII)
# A name ending like a checkpoint file is a missing file, not an id.
_FILE_SUFFIXES = ('.bin', '.ckpt', '.json', '.msgpack', '.npz', '.pt', '.pth',
                  '.pyth', '.safetensors')
# What `formats.hf` reads from a repo: safetensors where it has them, its
# PyTorch pickles only where it has none (repos often hold both, and
# TensorFlow and Flax weights too).
_SAFETENSORS = ('model.safetensors', 'model.safetensors.index.json')
_PATTERNS = (
    ['config.json', *_SAFETENSORS, 'model-*-of-*.safetensors'],
    ['config.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json',
     'pytorch_model-*-of-*.bin'],
)


def is_hub_id(path) -> bool:
  """Whether `path` names a Hub model (`owner/name[@revision]`) rather than a
  file: it looks like one and no file or directory of that name exists."""
  path = os.fspath(path)
  return (isinstance(path, str) and bool(match := _ID.fullmatch(path))
          and not match['repo'].lower().endswith(_FILE_SUFFIXES)
          and not os.path.exists(path))


def resolve(path):
  """The local directory of Hub id `path` (`is_hub_id`); other paths as they
  are.

  Downloads into the Hub client's cache what it lacks of the repo's
  `config.json` and weights (safetensors, else `pytorch_model.bin`).

  Raises:
    ValueError: `huggingface_hub` is not installed, or the repo is not one
      this package reads.
    FileNotFoundError: no such repo or revision, or it is not in the cache
      and the Hub cannot be asked (`HF_HUB_OFFLINE`, no network).
  """
  if not is_hub_id(path):
    return path
  path = os.fspath(path)
  match = _ID.fullmatch(path)
  repo, revision = match['repo'], match['revision']
  try:
    import huggingface_hub  # noqa: F401  pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        f'{path}: no such file or directory; read as a Hugging Face Hub id, '
        "it needs huggingface_hub: pip install 'tsformer_jax[hub]'.") from e
  for patterns in _PATTERNS:
    folder = _download(path, repo, revision, patterns)
    if any(os.path.isfile(os.path.join(folder, n)) for n in _SAFETENSORS):
      break
  if not os.path.isfile(os.path.join(folder, 'config.json')):
    raise ValueError(f'{path}: a Hugging Face Hub repo without config.json; '
                     'the Hub repos read here are Transformers TimeSformer '
                     'and ViT models.')
  _LOG.info('%s: the Hugging Face Hub snapshot in %s.', path, folder)
  return folder


def _download(path, repo, revision, patterns) -> str:
  """`snapshot_download`, its failures told in one line each."""
  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants
  from huggingface_hub import errors
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(repo, revision=revision,
                             allow_patterns=patterns)
  except errors.GatedRepoError as e:
    raise FileNotFoundError(
        f'{path}: a gated Hugging Face Hub repo: accept its terms at '
        f'{constants.ENDPOINT}/{repo}, then log in (hf auth login).') from e
  except errors.RepositoryNotFoundError as e:
    raise FileNotFoundError(
        f'{path}: no such file or directory, nor a Hugging Face Hub repo at '
        f'{constants.ENDPOINT} (a private one needs a login: hf auth '
        'login).') from e
  except errors.RevisionNotFoundError as e:
    raise FileNotFoundError(
        f'{path}: the Hugging Face Hub repo {repo} has no revision '
        f'{revision or "main"!r}.') from e
  except errors.LocalEntryNotFoundError as e:
    # Not (or not wholly) in the cache, and the Hub could not be asked.
    partly = isinstance(e, getattr(errors, 'IncompleteSnapshotError', ()))
    where = (f'{"only partly" if partly else "nor"} in the Hugging Face '
             f'cache ({constants.HF_HUB_CACHE})')
    command = f'hf download {repo}' + (f' --revision {revision}'
                                       if revision else '')
    if constants.HF_HUB_OFFLINE:
      raise FileNotFoundError(
          f'{path}: no such file or directory, {where}, and HF_HUB_OFFLINE is '
          f'set: download it once online ({command}) or pass a local '
          'path.') from e
    raise FileNotFoundError(
        f'{path}: no such file or directory, {where}, and the Hugging Face '
        f'Hub cannot be reached at {constants.ENDPOINT}: connect and retry '
        f'({command}), or pass a local path.') from e
