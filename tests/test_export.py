"""Export: Hugging Face directories and the original's `.pyth`, read back.

Parity runs `transformers`' TimeSformer (PyTorch, CPU, float32) on our
exported directories at shapes other than the defaults, and the original's
equations (`checkpoint_sources.OriginalModel`) on our `.pyth` files; the
round trips compare tensors bit for bit.
"""

import json
import os
import re
import subprocess
import sys
import zipfile

from absl import flags
import flax
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from transformers import TimesformerForVideoClassification

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import convert
from tsformer_jax import export
from tsformer_jax import predict
from tsformer_jax import tensor_io
from tsformer_jax import torch_writer
from tsformer_jax.checkpoints import export as export_lib
from tsformer_jax.checkpoints.formats import original

from checkpoint_sources import ROOT
from checkpoint_sources import OriginalModel
from checkpoint_sources import config_file
from checkpoint_sources import hf_timesformer
from conftest import WITHOUT_TORCH
from conftest import apply
from conftest import hf_logits
from conftest import random_clips
from conftest import tiny_config

ATOL = 1e-4  # float32 logits
NAMES = ('walk', 'run', 'jump', 'swim', 'climb')
# scheme, frames, image, patch, width, depth, heads (classes: NAMES).
CASES = [
    ('divided', 3, 48, 16, 32, 2, 2),
    ('divided', 3, 48, 8, 48, 2, 4),
    ('joint', 3, 48, 16, 32, 2, 2),
    ('joint', 3, 48, 8, 48, 2, 4),
]


def _config(scheme, frames=3, image=48, patch=16, width=32, depth=2,
            heads=2, names=NAMES):
  config = tiny_config(scheme, num_frames=frames, image_size=(image, image),
                       patch_size=patch, hidden_size=width, depth=depth,
                       num_heads=heads, mlp_dim=3 * width,
                       num_classes=len(names))
  config.data.class_names = tuple(names)
  return config


def _params(config, seed=0):
  """Every parameter random (zero-initialised ones too), LayerNorm scales
  near one; without compiling the initialisers."""
  shapes = jax.eval_shape(
      lambda: tsformer_jax.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  flat = {k: (0.1 * rng.normal(size=v.shape) + k.endswith('/scale')
              ).astype(np.float32) for k, v in _flat(shapes).items()}
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _flat(params):
  return flax.traverse_util.flatten_dict(params, sep='/')


def _assert_params_equal(got, want):
  got, want = _flat(got), _flat(want)
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert np.asarray(got[name]).dtype == np.float32, name
    assert np.array_equal(np.asarray(got[name]), value), name


def _load_hf(path):
  return TimesformerForVideoClassification.from_pretrained(str(path)).eval()


def _run_export(*args):
  return cli.call(export.main, ['export', *map(str, args)])


# ----------------------------------------------------------------------------
# Hugging Face

@pytest.mark.parametrize('scheme,frames,image,patch,width,depth,heads', CASES)
def test_hf_export_matches_transformers(tmp_path, scheme, frames, image,
                                        patch, width, depth, heads):
  config = _config(scheme, frames, image, patch, width, depth, heads)
  params = _params(config, seed=frames + heads)
  out = export_lib.write_hf(tmp_path / 'hf', config, params)
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  hf = _load_hf(out)
  assert hf.config.attention_type == export_lib.HF_EXPORT_TYPES[scheme]
  assert hf.config.id2label == dict(enumerate(NAMES))
  assert hf.config.label2id == {n: i for i, n in enumerate(NAMES)}
  clips = random_clips(config, batch_size=3, seed=heads)
  ours = apply(tsformer_jax.create_model(config), params, clips)
  want = hf_logits(hf, clips)
  assert ours.shape == want.shape == (3, len(NAMES))
  assert want.std() > 0.05  # Logits spread far beyond the tolerance.
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize('attention_type', ['divided_space_time',
                                            'joint_space_time'])
def test_hf_round_trip_is_exact(tmp_path, attention_type):
  hf = hf_timesformer(
      3, attention_type=attention_type, num_frames=3, image_size=48,
      patch_size=16, hidden_size=48, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=96, layer_norm_eps=1e-5,
      hidden_dropout_prob=0.1, id2label=dict(enumerate(NAMES)),
      label2id={n: i for i, n in enumerate(NAMES)})
  hf.save_pretrained(tmp_path / 'src')
  config, params = tsformer_jax.load_checkpoint(tmp_path / 'src')
  assert config.data.class_names == NAMES
  out = export_lib.write_hf(tmp_path / 'out', config, params)
  want = safetensors.numpy.load_file(tmp_path / 'src' / 'model.safetensors')
  got = safetensors.numpy.load_file(os.path.join(out, 'model.safetensors'))
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].dtype == value.dtype == np.float32, name
    assert np.array_equal(got[name], value), name
  with open(tmp_path / 'src' / 'config.json', encoding='utf-8') as f:
    want_config = json.load(f)
  with open(os.path.join(out, 'config.json'), encoding='utf-8') as f:
    got_config = json.load(f)
  for key, value in want_config.items():
    if key != 'transformers_version':
      assert got_config[key] == value, key
  clips = random_clips(config, batch_size=2)
  np.testing.assert_array_equal(hf_logits(_load_hf(out), clips),
                                hf_logits(hf, clips))


def test_a_sigmoid_head_travels_as_transformers_multi_label(tmp_path):
  """`model.loss='sigmoid'` is written as transformers' problem_type, whose
  loss is then ours (`losses.loss`), and read back as sigmoid."""
  from tsformer_jax import losses  # pylint: disable=g-import-not-at-top
  config = _config('divided')
  config.model.loss = 'sigmoid'
  params = _params(config)
  out = export_lib.write_hf(tmp_path / 'hf', config, params)
  hf = _load_hf(out)
  assert hf.config.problem_type == 'multi_label_classification'
  clips = random_clips(config, batch_size=2)
  targets = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], np.float32)
  with torch.no_grad():
    hf_loss = hf(pixel_values=torch.from_numpy(
        np.asarray(clips).transpose(0, 1, 4, 2, 3)),
                 labels=torch.from_numpy(targets)).loss
  logits = apply(tsformer_jax.create_model(config), params, clips)
  np.testing.assert_allclose(
      float(losses.loss('sigmoid', logits, targets)), float(hf_loss),
      rtol=1e-5)
  assert tsformer_jax.load_checkpoint(out)[0].model.loss == 'sigmoid'
  config.model.loss = 'softmax'
  back = export_lib.write_hf(tmp_path / 'softmax', config, params)
  assert tsformer_jax.load_checkpoint(back)[0].model.loss == 'softmax'


@pytest.mark.parametrize('scheme', ['divided', 'joint'])
def test_hf_state_dict_is_the_readers_inverse(scheme):
  config = _config(scheme, heads=4)
  params = _params(config)
  state = export_lib.to_hf_state_dict(config, params)
  assert set(state) == set(
      k for k in state if k.startswith(('timesformer.', 'classifier.')))
  _assert_params_equal(checkpoints.params_from_hf_state_dict(state, config),
                       params)
  again = export_lib.to_hf_state_dict(
      config, checkpoints.params_from_hf_state_dict(state, config))
  assert all(np.array_equal(again[k], v) for k, v in state.items())


def test_class_names_and_the_headless_model(tmp_path):
  # Without names of its own, a model takes its dataset's...
  config = tiny_config('joint', num_classes=2)
  config.data.dataset = 'synthetic_motion'
  assert export_lib.class_names(config) == ['red_then_blue', 'blue_then_red']
  # ...or transformers' placeholders, which read back as no names.
  config.model.num_classes = 3
  config.data.dataset = 'kinetics400'
  assert export_lib.class_names(config) == ['LABEL_0', 'LABEL_1', 'LABEL_2']
  out = export_lib.write_hf(tmp_path / 'hf', config, _params(config))
  config, _ = tsformer_jax.load_checkpoint(out)
  assert config.data.class_names == ()
  config.data.class_names = ('a', 'b')
  with pytest.raises(ValueError, match='holds 2 names but the model has 3'):
    export_lib.class_names(config)
  # No head: HF's classifier is the identity, and 0 classes read back.
  config = tiny_config('divided', num_classes=0)
  out = export_lib.write_hf(tmp_path / 'headless', config, _params(config))
  hf = _load_hf(out)
  assert hf.config.num_labels == 0
  assert isinstance(hf.classifier, torch.nn.Identity)
  config, _ = tsformer_jax.load_checkpoint(out)
  assert config.model.num_classes == 0


@pytest.mark.parametrize('scheme,message', [
    ('space_only', r"^Hugging Face's space_only TimeSformer classifies each "
     r'frame alone \(logits \[B \* T, C\]\) where ours, like the original, '
     r"averages the frames' class tokens before the norm and head; export "
     r'it with --to=pyth\.$'),
    ('axial', r"^Hugging Face's TimeSformer has no 'axial' attention; it has "
     r'divided_space_time, joint_space_time, space_only \(exported: '
     r'divided, joint\)\.$'),
    ('sparse_local_global', r"^Hugging Face's TimeSformer has no "
     r"'sparse_local_global' attention"),
])
def test_hf_refuses_what_it_computes_otherwise(tmp_path, scheme, message):
  config = tiny_config(scheme)
  with pytest.raises(ValueError, match=message):
    export_lib.write_hf(tmp_path / 'hf', config, _params(config))
  config = tiny_config('divided', image_size=(32, 48))
  with pytest.raises(ValueError, match=r'square frames; config\.model\.'
                     r'image_size is \(32, 48\)\.'):
    export_lib.write_hf(tmp_path / 'hf', config, _params(config))
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# The original's .pyth

@pytest.mark.parametrize('scheme', ['divided', 'joint', 'space_only'])
def test_pyth_export_reads_back_and_matches_the_original(tmp_path, scheme):
  config = _config(scheme, frames=3, image=32, patch=8, width=32, heads=4)
  params = _params(config, seed=1)
  path = export_lib.write_pyth(tmp_path / 'model.pyth', config, params)
  assert checkpoints.detect_format(path) == 'original'
  for hint in (config, None):  # The cfg records the head count.
    got_config, got = tsformer_jax.load_checkpoint(path, hint)
    _assert_params_equal(got, params)
    assert got_config.model.to_dict() == config.model.to_dict()
  # torch loads it without running code, and the original's model takes it.
  checkpoint = torch.load(path, weights_only=True)
  assert checkpoint['epoch'] == -1
  attention_type = {v: k for k, v in
                    checkpoints.HF_ATTENTION_TYPES.items()}[scheme]
  assert f'ATTENTION_TYPE: {attention_type}' in checkpoint['cfg']
  assert 'NUM_FRAMES: 3\n' in checkpoint['cfg']
  reference = OriginalModel(config.model).eval()
  reference.load_state_dict(checkpoint['model_state'], strict=True)
  clips = random_clips(config, batch_size=2, seed=2)
  with torch.no_grad():
    want = reference.model(torch.from_numpy(clips)).numpy()
  ours = apply(tsformer_jax.create_model(config), params, clips)
  assert want.std() > 0.05
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


def test_pyth_reads_back_without_a_config_at_a_vit_width(tmp_path):
  config = _config('divided', width=192, depth=1, heads=3)  # ViT-Ti's.
  params = _params(config)
  path = export_lib.write_pyth(tmp_path / 'model.pyth', config, params)
  got_config, got = tsformer_jax.load_checkpoint(path)
  _assert_params_equal(got, params)
  for key in ('attention', 'num_frames', 'image_size', 'patch_size',
              'hidden_size', 'depth', 'num_heads', 'mlp_dim', 'num_classes'):
    assert got_config.model[key] == config.model[key], key


def test_pyth_records_heads_and_dataset_as_the_original_names_them(
    tmp_path):
  # 4 heads at ViT-Ti's width (which has 3): only the cfg can tell.
  config = config_lib.get_config('divided', 'tiny,ssv2')
  config.model.update(hidden_size=192, num_heads=4, mlp_dim=384, depth=1)
  params = _params(config)
  path = export_lib.write_pyth(tmp_path / 'ssv2.pyth', config, params)
  cfg = torch.load(path, weights_only=True)['cfg']
  assert 'TRAIN:\n  DATASET: ssv2\n' in cfg
  assert 'TIMESFORMER:\n  ATTENTION_TYPE: divided_space_time\n' \
      '  NUM_HEADS: 4\n' in cfg
  got_config, got = tsformer_jax.load_checkpoint(path)
  _assert_params_equal(got, params)
  assert got_config.model.to_dict() == config.model.to_dict()
  assert got_config.data.dataset == 'ssv2'
  # The original's yacs refuses keys it lacks: none in a cfg it can run.
  for dataset in ('kinetics400', 'kinetics600', 'diving48'):
    base = config_lib.get_config('divided', f'base,{dataset}')
    cfg = export_lib.original_cfg(base)
    assert 'NUM_HEADS' not in cfg and 'MODEL_NAME: vit_base' in cfg
    assert original.config_from_cfg(cfg, 'divided',
                                    'cfg').data.dataset == dataset


def test_pyth_refuses_schemes_pytorch_lacks(tmp_path):
  config = tiny_config('axial')
  with pytest.raises(ValueError, match=r"^PyTorch TimeSformers have no "
                     r"'axial' attention; they have \['divided', 'joint', "
                     r"'space_only'\]\.$"):
    export_lib.write_pyth(tmp_path / 'model.pyth', config, _params(config))
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# Writing files without torch

def test_torch_and_safetensors_writers(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      'f32': rng.normal(size=(2, 3)).astype(np.float32),
      'transposed': rng.normal(size=(3, 4)).astype(np.float32).T,
      'scalar': np.array(3.5, np.float64),
      'empty': np.zeros((0, 3), np.float16),
      'ints': np.arange(5, dtype=np.int64),
      'mask': np.array([True, False]),
  }
  obj = {'model_state': tensors, 'epoch': 15, 'big': 2 ** 40, 'neg': -3,
         'rate': 0.5, 'cfg': 'DATA:\n  NUM_FRAMES: 8\n',
         'nested': [1, None, True, (2, 'a'), {}, []]}
  path = tmp_path / 'file.pyth'
  torch_writer.write_torch(path, obj)
  loaded = torch.load(path, weights_only=True)
  read = tensor_io.read_torch(path)
  for name, value in tensors.items():
    assert tuple(loaded['model_state'][name].shape) == value.shape, name
    assert np.array_equal(loaded['model_state'][name].numpy(), value), name
    assert np.asarray(read['model_state'][name]).dtype == value.dtype, name
    assert np.array_equal(np.asarray(read['model_state'][name]), value), name
  rest = {k: v for k, v in obj.items() if k != 'model_state'}
  assert {k: v for k, v in loaded.items() if k != 'model_state'} == rest
  assert {k: v for k, v in read.items() if k != 'model_state'} == rest
  with zipfile.ZipFile(path) as archive:  # Storages start 64-byte aligned.
    for info in archive.infolist():
      with open(path, 'rb') as f:
        f.seek(info.header_offset + 26)
        name, extra = np.frombuffer(f.read(4), '<u2')
      assert (info.header_offset + 30 + name + extra) % 64 == 0
  path = tmp_path / 'file.safetensors'
  tensor_io.write_safetensors(path, tensors, {'format': 'pt'})
  loaded = safetensors.numpy.load_file(path)
  assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())
  assert all(np.array_equal(np.asarray(v), tensors[k])
             for k, v in tensor_io.read_safetensors(path).items())


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
  def fail(path, *args, **kwargs):
    with open(path, 'wb') as f:
      f.write(b'half')
    raise OSError('disk full')
  monkeypatch.setattr(tensor_io, 'write_safetensors', fail)
  monkeypatch.setattr(torch_writer, 'write_torch', fail)
  config = _config('divided')
  for write, name in ((export_lib.write_hf, 'hf'),
                      (export_lib.write_pyth, 'model.pyth')):
    with pytest.raises(OSError, match='disk full'):
      write(tmp_path / name, config, _params(config))
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# The command line

def test_cli_exports_both_formats(tmp_path, capsys):
  config = _config('divided')
  params = _params(config)
  src = checkpoints.save_checkpoint(tmp_path / 'ours', config, params)
  assert _run_export(src, tmp_path / 'hf', '--to=hf') == 0
  assert 'ours -> ' in capsys.readouterr().out
  hf = _load_hf(tmp_path / 'hf')
  assert hf.config.id2label == dict(enumerate(NAMES))
  clips = random_clips(config, seed=5)
  np.testing.assert_allclose(
      apply(tsformer_jax.create_model(config), params, clips),
      hf_logits(hf, clips), atol=ATOL, rtol=0)
  # The Hugging Face directory exports on to the original's layout.
  assert _run_export(tmp_path / 'hf', tmp_path / 'model.pyth',
                     '--to=pyth') == 0
  _, got = tsformer_jax.load_checkpoint(tmp_path / 'model.pyth', config)
  _assert_params_equal(got, params)
  # An existing OUT stays unless --overwrite.
  capsys.readouterr()
  assert _run_export(src, tmp_path / 'hf', '--to=hf') == 1
  assert capsys.readouterr().err == (
      f'export: error: {tmp_path / "hf"} exists; pass overwrite=True '
      '(--overwrite) to replace it.\n')
  assert _run_export(src, tmp_path / 'hf', '--to=hf',
                     '--overwrite') == 0


def test_cli_changes_nothing_unasked_as_convert(tmp_path, capsys):
  # Tiny's config: 4 frames and 10 classes, where the checkpoint has 2 and 5.
  config = tiny_config('divided', num_frames=2, num_classes=len(NAMES))
  config.data.class_names = NAMES
  src = checkpoints.save_checkpoint(tmp_path / 'ours', config,
                                    _params(config))
  args = [src, tmp_path / 'hf', config_file('divided')]
  assert _run_export(*args) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f'export: error: {src} does not fit that config as it is; fitting it '
      'would change: resampled time_embedding from 2 to 4 frames (nearest). '
      'new head for 10 classes (checkpoint: 5). Pass --adapt '
      '(load_checkpoint(..., fit=True)) to change them.')
  assert not (tmp_path / 'hf').exists()
  assert _run_export(*args, '--adapt') == 0
  err = capsys.readouterr().err
  assert 'export: ' + (f'{src}: resampled time_embedding from 2 to 4 frames '
                       '(nearest).') in err
  assert f'export: {src}: new head for 10 classes (checkpoint: 5).' in err
  hf = _load_hf(tmp_path / 'hf')
  assert (hf.config.num_frames, hf.config.num_labels) == (4, 10)
  # A headless export is what --num_classes=0 asks for.
  assert _run_export(src, tmp_path / 'features', '--num_classes=0') == 0
  assert _load_hf(tmp_path / 'features').config.num_labels == 0


@pytest.mark.parametrize('args,status,error', [
    (['--to=hf'], 1, "Hugging Face's space_only TimeSformer classifies "
     'each frame alone'),
    (['--to=onnx'], 2, 'flag --to=onnx: value should be one of <hf|pyth>'),
    # The spelling before --to, where --format named the output's format.
    (['--format=pyth'], 2, '--format names the format of CHECKPOINT; to '
     'write pyth, pass --to=pyth.'),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, status, error):
  config = tiny_config('space_only')
  src = checkpoints.save_checkpoint(tmp_path / 'ours', config,
                                    _params(config))
  assert _run_export(src, tmp_path / 'out', *args) == status
  err = capsys.readouterr().err
  assert err.startswith(f'export: error: {error}')
  assert err.count('\n') == 1
  assert not (tmp_path / 'out').exists()
  assert _run_export(src) == 2
  assert capsys.readouterr().err.startswith(
      'export: error: Pass CHECKPOINT and OUT')


def test_help_lists_the_shared_flags_each_entry_point_takes():
  def listed(module):
    text = flags.FLAGS.module_help(module.__name__)
    return set(re.findall(r'^  --(?:\[no\])?(\w+)', text, re.MULTILINE))

  loading = {'config', 'format', 'num_classes', 'pos_resize', 'adapt',
             'class_names'}
  assert listed(export) == loading | {'overwrite', 'to'}
  assert listed(convert) == loading | {'overwrite'}
  assert listed(predict) & loading == set()
  assert {'checkpoint', 'json', 'overwrite', 'top_k'} <= listed(predict)


_NO_TORCH = WITHOUT_TORCH + '''
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import export
src, out = sys.argv[1:]
for fmt in ('hf', 'pyth'):
  assert cli.call(export.main, ['export', src, out + '.' + fmt,
                                '--to=' + fmt]) == 0
assert not any(m.split('.')[0] == 'torch' for m in sys.modules)
'''


@pytest.mark.slow
def test_export_runs_as_a_program_and_without_torch(tmp_path):
  config = _config('joint')
  params = _params(config)
  src = checkpoints.save_checkpoint(tmp_path / 'ours', config, params)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
  result = subprocess.run(
      [sys.executable, '-m', 'tsformer_jax.export', src, tmp_path / 'cli',
       '--to=hf'], capture_output=True, text=True, env=env, timeout=300,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _load_hf(tmp_path / 'cli').config.id2label == dict(enumerate(NAMES))
  result = subprocess.run(
      [sys.executable, '-c', _NO_TORCH, src, tmp_path / 'out'],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  hf = _load_hf(tmp_path / 'out.hf')
  clips = random_clips(config)
  np.testing.assert_allclose(
      apply(tsformer_jax.create_model(config), params, clips),
      hf_logits(hf, clips), atol=ATOL, rtol=0)
  _, got = tsformer_jax.load_checkpoint(tmp_path / 'out.pyth', config)
  _assert_params_equal(got, params)

