"""Tensor files: every tensor rebuilt, nothing pickled ever run."""

import pickle
import re

import numpy as np
import pytest
from safetensors.torch import save_file
import torch
from torch import nn

import tsformer_jax
from tsformer_jax import cli
from tsformer_jax import convert
from tsformer_jax import tensor_io
from tsformer_jax import torch_writer

from checkpoint_sources import hf_timesformer
from checkpoint_sources import save_hf


class _RunsCode:
  """Unpickling this runs code: it writes the marker file."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return exec, (f'open({self.marker!r}, "w").close()',)


@pytest.mark.parametrize('kind', ['pickle', 'torch_zip', 'torch_legacy',
                                  'hf_bin'])
def test_malicious_pickle_runs_nothing(tmp_path, kind):
  marker = tmp_path / 'ran'
  payload = {'model_state': {'model.pos_embed': _RunsCode(marker),
                             'model.cls_token': torch.zeros(1, 1, 4)}}
  path = tmp_path / 'evil.pyth'
  if kind == 'pickle':
    with open(path, 'wb') as f:
      pickle.dump(payload, f)
  elif kind == 'hf_bin':
    hf = hf_timesformer(0, num_frames=2, image_size=16, patch_size=8,
                        hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)
    path = save_hf(hf, tmp_path / 'hf', 'bin')
    state = dict(hf.state_dict())
    state['classifier.bias'] = _RunsCode(marker)
    torch.save(state, path / 'pytorch_model.bin')
  else:
    torch.save(payload, path,
               _use_new_zipfile_serialization=kind == 'torch_zip')
  with pytest.raises(tensor_io.UnsafePickleError,
                     match=r'global (__builtin__|builtins)\.exec'):
    tsformer_jax.load_checkpoint(path)
  assert cli.call(convert.main,
                  ['convert', str(path), str(tmp_path / 'out')]) == 1
  assert not marker.exists() and not (tmp_path / 'out').exists()
  if kind == 'pickle':  # The payload is real: plain pickle runs it.
    with open(path, 'rb') as f:
      pickle.load(f)
    assert marker.exists()


def test_torch_reader_rebuilds_every_tensor(tmp_path):
  base = torch.arange(20.0).reshape(4, 5)
  tensors = {'plain': base, 'transposed': base.T, 'view': base[1:, 2:],
             'half': torch.randn(3).half(), 'bf16': torch.randn(3).bfloat16(),
             'long': torch.arange(6)[::2], 'bool': torch.tensor([True, False]),
             'scalar': torch.tensor(2.5), 'empty': torch.zeros(0, 3),
             'parameter': nn.Parameter(torch.randn(2, 2))}
  for legacy in (False, True):
    path = tmp_path / f'{legacy}.pt'
    torch.save({'state_dict': tensors, 'step': 3, 'name': 'x'}, path,
               _use_new_zipfile_serialization=not legacy)
    got = tensor_io.read_torch(str(path))
    assert (got['step'], got['name']) == (3, 'x')
    for name, tensor in tensors.items():
      want = tensor.detach().float().numpy() if tensor.is_floating_point() \
          else tensor.numpy()
      value = np.asarray(got['state_dict'][name])
      assert value.shape == want.shape, name
      np.testing.assert_array_equal(value.astype(want.dtype), want)
  # safetensors with bfloat16.
  save_file({'bf16': tensors['bf16'], 'plain': base},
            str(tmp_path / 'x.safetensors'))
  got = tensor_io.read_safetensors(str(tmp_path / 'x.safetensors'))
  np.testing.assert_array_equal(np.asarray(got['bf16'], np.float32),
                                tensors['bf16'].float().numpy())
  np.testing.assert_array_equal(np.asarray(got['plain']), base.numpy())


def test_a_rewritten_storage_type_spoils_no_later_file(tmp_path):
  """BUILD on an allowed global: it must not change that global for every
  file read after it in this process."""
  legit = tmp_path / 'legit.pth'
  torch_writer.write_torch(legit, {'w': np.arange(4, dtype=np.float32)})
  evil = tmp_path / 'evil.pth'  # torch.FloatStorage.__dict__['dtype'] = ...
  evil.write_bytes(
      pickle.PROTO + b'\x02' + pickle.GLOBAL + b'torch\nFloatStorage\n' +
      pickle.EMPTY_DICT + pickle.MARK + pickle.BINUNICODE +
      (5).to_bytes(4, 'little') + b'dtype' + pickle.GLOBAL +
      b'torch\nBoolStorage\n' + pickle.SETITEMS + pickle.BUILD + pickle.STOP)
  with pytest.raises(ValueError, match=r'evil\.pth: not a torch\.save file'):
    tensor_io.read_torch(evil)
  got = tensor_io.read_torch(legit)['w']
  assert got.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(got), np.arange(4))


def test_damaged_files_name_themselves(tmp_path, capsys):
  hf = hf_timesformer(0, num_frames=2, image_size=16, patch_size=8,
                      hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32,
                      num_labels=3)
  src = save_hf(hf, tmp_path / 'hf', 'safetensors')
  weights = src / 'model.safetensors'
  size = weights.stat().st_size
  weights.write_bytes(weights.read_bytes()[:size // 2])
  assert cli.call(convert.main, ['convert', str(src),
                                 str(tmp_path / 'out')]) == 1
  assert re.fullmatch(
      f'convert: error: {re.escape(str(weights))}: not a readable '
      r'safetensors file \(truncated or corrupt\): .*file not fully '
      r'covered\.',
      capsys.readouterr().err.strip().splitlines()[-1])
  (src / 'config.json').write_text('{"model_type": "timesformer",')
  with pytest.raises(ValueError, match=r'config\.json: not readable JSON'):
    tsformer_jax.load_checkpoint(src)

  np.savez(tmp_path / 'x.npz', a=np.zeros((100, 100), np.float32))
  data = (tmp_path / 'x.npz').read_bytes()
  (tmp_path / 'cut.npz').write_bytes(data[:len(data) // 2])
  (tmp_path / 'junk.npz').write_bytes(b'not an archive' * 10)
  np.savez(tmp_path / 'objects.npz', a=np.array([{}], dtype=object))
  for name, reason in (('cut', r' \(truncated or corrupt\): File is not a '
                                r'zip file\.'),
                       ('junk', ': no zip of arrays, or arrays of pickled '
                                r'objects \(never loaded\)\.'),
                       ('objects', ': no zip of arrays')):
    path = tmp_path / f'{name}.npz'
    with pytest.raises(ValueError) as error:
      tsformer_jax.load_checkpoint(path)
    assert re.match(rf'{re.escape(str(path))}: not a readable \.npz{reason}',
                    str(error.value))
    assert 'allow_pickle' not in str(error.value)
