"""Reading every checkpoint format, and writing ours.

Each reader is checked against the model that wrote the file: logits match
to float32 precision (`checkpoint_sources` builds the files).
"""

import json
import os
import pathlib
import subprocess
import sys

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from transformers import TimesformerConfig
from transformers import TimesformerModel

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import convert

from checkpoint_sources import ROOT
from checkpoint_sources import VIT_FORMATS
from checkpoint_sources import OriginalModel
from checkpoint_sources import config_file
from checkpoint_sources import hf_timesformer
from checkpoint_sources import original_pyth
from checkpoint_sources import random_params
from checkpoint_sources import randomize
from checkpoint_sources import run_convert
from checkpoint_sources import save_hf
from checkpoint_sources import save_vits
from checkpoint_sources import torch_nearest_2d
from conftest import WITHOUT_TORCH
from conftest import apply
from conftest import hf_logits
from conftest import random_clips
from conftest import tiny_config

ATOL = 1e-4  # float32 logits


def _items(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _items(value, prefix + (key,))
    else:
      yield prefix + (key,), value


@pytest.fixture(scope='module')
def vit_files(tmp_path_factory):
  return save_vits(tmp_path_factory.mktemp('vit'))


# ----------------------------------------------------------------------------
# Hugging Face TimeSformer

HF_CASES = [
    # attention_type, frames, image, patch, width, depth, heads, classes,
    # weights file
    ('divided_space_time', 3, 32, 8, 32, 2, 2, 5, 'safetensors'),
    ('divided_space_time', 2, 48, 16, 48, 1, 4, 7, 'bin'),
    ('joint_space_time', 3, 32, 8, 32, 2, 2, 5, 'safetensors'),
    ('joint_space_time', 5, 32, 16, 64, 1, 8, 4, 'legacy_bin'),
    ('space_only', 3, 32, 8, 32, 2, 2, 5, 'bin'),
    ('space_only', 2, 48, 16, 48, 2, 3, 6, 'safetensors'),
]


@pytest.mark.parametrize(
    'attention_type,frames,image,patch,width,depth,heads,classes,weights',
    HF_CASES)
def test_hf_timesformer_through_cli_matches_pytorch(
    tmp_path, attention_type, frames, image, patch, width, depth, heads,
    classes, weights):
  hf = hf_timesformer(frames + depth, attention_type=attention_type,
                      num_frames=frames, image_size=image, patch_size=patch,
                      hidden_size=width, num_hidden_layers=depth,
                      num_attention_heads=heads,
                      intermediate_size=3 * width, num_labels=classes)
  src = save_hf(hf, tmp_path / 'hf', weights)
  assert checkpoints.detect_format(src) == 'hf_timesformer'
  run_convert(src, tmp_path / 'out')
  config, params = tsformer_jax.load_checkpoint(tmp_path / 'out')
  assert config.model.attention == checkpoints.HF_ATTENTION_TYPES[
      attention_type]
  assert (config.model.num_frames, config.model.num_heads) == (frames, heads)
  clips = random_clips(config, seed=frames)
  ours = apply(tsformer_jax.create_model(config), params, clips)
  want = hf_logits(hf, clips)
  assert ours.shape == want.shape == (2, classes)
  assert want.std() > 0.05  # Logits spread far beyond the tolerance.
  print(f'max |logit difference| {attention_type} {frames}x{image}: '
        f'{np.abs(ours - want).max():.2e}')
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize('attention_type', ['divided_space_time',
                                            'joint_space_time'])
def test_hf_backbone_loads_as_features(tmp_path, attention_type):
  """A `TimesformerModel` (no head, no 'timesformer.' prefix): 0 classes,
  our features its class token, from a directory or its weights alone."""
  hf = randomize(TimesformerModel(TimesformerConfig(
      attention_type=attention_type, num_frames=3, image_size=32,
      patch_size=8, hidden_size=48, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=96)), 1)
  hf.save_pretrained(tmp_path / 'hf')
  config, params = tsformer_jax.load_checkpoint(tmp_path / 'hf')
  assert (config.model.num_classes, config.data.class_names) == (0, ())
  assert config.model.num_heads == 4 and 'head' not in params
  clips = random_clips(config, seed=3)
  pixels = torch.from_numpy(clips).permute(0, 1, 4, 2, 3)
  with torch.no_grad():
    want = hf(pixels).last_hidden_state[:, 0].numpy()
  ours = apply(tsformer_jax.create_model(config), params, clips)
  assert ours.shape == want.shape == (2, 48)
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)
  # The weights file alone, its sizes given by a config of 0 classes.
  alone = tmp_path / 'alone.safetensors'
  alone.write_bytes((tmp_path / 'hf' / 'model.safetensors').read_bytes())
  assert checkpoints.detect_format(alone) == 'hf_timesformer'
  _, again = tsformer_jax.load_checkpoint(alone, config, fit=False)
  again = dict(_items(again))
  assert sorted(again) == sorted(dict(_items(params)))
  for path, value in _items(params):
    np.testing.assert_array_equal(again[path], value)


# ----------------------------------------------------------------------------
# The original implementation (see checkpoint_sources)

@pytest.mark.parametrize('scheme,legacy', [('divided', False),
                                           ('divided', True),
                                           ('joint', False),
                                           ('space_only', False)])
def test_original_pyth_matches_the_original_forward(tmp_path, scheme, legacy):
  config, reference = original_pyth(tmp_path / 'model.pyth', scheme,
                                    legacy=legacy)
  assert checkpoints.detect_format(tmp_path / 'model.pyth') == 'original'
  # The original does not record the number of heads: the config does.
  run_convert(tmp_path / 'model.pyth', tmp_path / 'out', config_file(scheme))
  loaded, params = tsformer_jax.load_checkpoint(tmp_path / 'out')
  assert loaded.model.to_dict() == config.model.to_dict()
  clips = random_clips(config, seed=3)
  ours = apply(tsformer_jax.create_model(loaded), params, clips)
  with torch.no_grad():
    want = reference(torch.from_numpy(clips)).numpy()
  assert want.std() > 0.05
  print(f'max |logit difference| original {scheme}: '
        f'{np.abs(ours - want).max():.2e}')
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


def test_token_order_matters_to_the_reference():
  """The (h w t) order is load-bearing: the torch reference fed the same
  weights but patches in (t h w) order gives other logits, so the match
  above checks the order, not just the names."""
  config = tiny_config('divided')
  reference = randomize(OriginalModel(config.model), 0).model
  clips = torch.from_numpy(random_clips(config, seed=3))
  block = reference.blocks[0]
  x = torch.randn(2, 1 + 16 * 4, 64)
  with torch.no_grad():
    in_order = block(x, 4)
    # The same tokens listed time-major, run, then put back.
    patches = x[:, 1:].reshape(2, 16, 4, 64)
    swapped = torch.cat([x[:, :1], patches.transpose(1, 2).flatten(1, 2)], 1)
    out = block(swapped, 4)[:, 1:].reshape(2, 4, 16, 64).transpose(1, 2)
    assert (out.flatten(1, 2) - in_order[:, 1:]).abs().max() > 1e-2
    assert reference(clips).shape == (2, 10)


# ----------------------------------------------------------------------------
# ImageNet ViT

@pytest.mark.parametrize('fmt', VIT_FORMATS)
def test_vit_init_is_the_image_model_frame_by_frame(vit_files, fmt):
  """space_only: exactly the ViT on each frame, class tokens averaged.
  divided (zero temporal_fc and time embedding): exactly the ViT when the
  frames are one image (the shared class token averages identical frames)."""
  hf, files = vit_files
  clips = random_clips(tiny_config('space_only'), seed=5)
  frames = torch.from_numpy(clips).flatten(0, 1).permute(0, 3, 1, 2)
  with torch.no_grad():
    hidden = hf.vit(frames, output_hidden_states=True).hidden_states[-1]
    cls = hidden[:, 0].reshape(2, 4, -1).mean(1)
    want = hf.classifier(hf.vit.layernorm(cls)).numpy()
  config, params = tsformer_jax.load_checkpoint(files[fmt],
                                                tiny_config('space_only'))
  ours = apply(tsformer_jax.create_model(config), params, clips)
  assert want.std() > 0.05
  print(f'max |logit difference| {fmt} space_only: '
        f'{np.abs(ours - want).max():.2e}')
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)

  still = np.repeat(clips[:, :1], 4, axis=1)  # One image, four frames.
  with torch.no_grad():
    want = hf(frames[::4]).logits.numpy()
  config, params = tsformer_jax.load_checkpoint(files[fmt],
                                                tiny_config('divided'))
  ours = apply(tsformer_jax.create_model(config), params, still)
  print(f'max |logit difference| {fmt} divided: '
        f'{np.abs(ours - want).max():.2e}')
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


def test_vit_head_default_config_pre_logits_and_resolution(vit_files):
  _, files = vit_files
  # The checkpoint's own config: divided over 8 frames, its 10 classes.
  config, params = tsformer_jax.load_checkpoint(files['vit_npz'])
  assert (config.model.attention, config.model.num_frames,
          config.model.num_classes) == ('divided', 8, 10)
  assert tuple(config.model.image_size) == (32, 32)
  assert config.model.num_heads == 4  # Read from the npz kernels.
  # Another class count: a new head, the rest unchanged.
  _, other = tsformer_jax.load_checkpoint(files['vit_npz'], num_classes=7,
                                          rng=jax.random.key(3))
  assert other['head']['kernel'].shape == (64, 7)
  assert 0 < np.std(other['head']['kernel']) < 0.03
  assert not np.any(other['head']['bias'])
  np.testing.assert_array_equal(other['block_1']['mlp']['fc2']['kernel'],
                                params['block_1']['mlp']['fc2']['kernel'])
  # ImageNet-21k files: the head sits on pre_logits, so both are dropped.
  config, params = tsformer_jax.load_checkpoint(files['pre_logits'])
  assert config.model.num_classes == 400
  assert params['head']['kernel'].shape == (64, 400)
  # Into twice the frame size: the position embedding resampled on the grid.
  image = np.load(files['vit_npz'])['Transformer/posembed_input/pos_embedding']
  _, params = tsformer_jax.load_checkpoint(
      files['vit_npz'], tiny_config('divided', image_size=(64, 64)))
  np.testing.assert_array_equal(params['pos_embedding'][:, :1], image[:, :1])
  np.testing.assert_array_equal(params['pos_embedding'][:, 1:],
                                torch_nearest_2d(image[:, 1:], (4, 4), (8, 8)))


# ----------------------------------------------------------------------------
# Without torch

_NO_TORCH = WITHOUT_TORCH + '''
import json
import flax
import numpy as np
import tsformer_jax
from tsformer_jax import config_lib
sums = {}
for name, path, scheme in json.loads(sys.argv[1]):
  config = config_lib.get_config(scheme, 'tiny') if scheme else None
  _, params = tsformer_jax.load_checkpoint(path, config)
  sums[name] = {'/'.join(k): float(np.sum(np.asarray(v, np.float64)))
                for k, v in flax.traverse_util.flatten_dict(params).items()}
assert not any(m.split('.')[0] == 'torch' for m in sys.modules)
print(json.dumps(sums))
'''


@pytest.mark.slow
def test_loading_works_without_torch(tmp_path, vit_files):
  _, files = vit_files
  original_pyth(tmp_path / 'model.pyth', 'divided')
  original_pyth(tmp_path / 'legacy.pyth', 'joint', legacy=True)
  hf = hf_timesformer(0, num_frames=2, image_size=16, patch_size=8,
                      hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32)
  save_hf(hf, tmp_path / 'hf_bin', 'bin')
  jobs = [('pyth', str(tmp_path / 'model.pyth'), 'divided'),
          ('legacy', str(tmp_path / 'legacy.pyth'), 'joint'),
          ('hf_bin', str(tmp_path / 'hf_bin'), None),
          ('vit_timm', str(files['vit_timm']), 'divided'),
          ('vit_hf', str(files['vit_hf']), 'space_only')]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
  result = subprocess.run([sys.executable, '-c', _NO_TORCH, json.dumps(jobs)],
                          capture_output=True, text=True, env=env, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  sums = json.loads(result.stdout.strip().splitlines()[-1])
  for name, path, scheme in jobs:
    config = config_lib.get_config(scheme, 'tiny') if scheme else None
    _, params = tsformer_jax.load_checkpoint(path, config)
    want = {'/'.join(k): float(np.sum(np.asarray(v, np.float64)))
            for k, v in _items(params)}
    assert sums[name] == want, name


# ----------------------------------------------------------------------------
# Orbax, training checkpoints, errors

def test_orbax_round_trip(tmp_path, monkeypatch):
  config = tiny_config('sparse_local_global', image_size=(32, 48))
  config.init_from.path = 'somewhere.npz'
  params = random_params(config)
  checkpoints.save_checkpoint(tmp_path / 'ckpt', config, params)
  assert checkpoints.detect_format(tmp_path / 'ckpt') == 'orbax'
  monkeypatch.chdir(tmp_path)  # A relative path, as users type it.
  loaded_config, loaded = tsformer_jax.load_checkpoint('ckpt')
  assert loaded_config.to_dict() == config.to_dict()
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params),
                       strict=True):
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(want))
  # Existing output: refused unless asked to overwrite.
  with pytest.raises(FileExistsError):
    checkpoints.save_checkpoint(tmp_path / 'ckpt', config, params)
  checkpoints.save_checkpoint(tmp_path / 'ckpt', config, params,
                              overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['ckpt']


def test_each_reader_gives_every_field_of_the_recipe(tmp_path, vit_files):
  """Configs come back whole, with nothing for their readers to fall back
  on: one saved by an older version (fields since added filled as that run
  had them, `config_lib.upgrade`), those made from a Hugging Face
  directory, a `.pyth` and an image ViT, and one passed in by hand."""
  fields = lambda c: sorted(_items(c.to_dict()))
  recipe = [path for path, _ in fields(config_lib.get_config('divided'))]
  config = tiny_config('divided')
  params = random_params(config)
  old = checkpoints.config_to_json(config)
  del old['sharding'], old['model']['remat'], old['data']['resize']
  ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      params=ocp.StandardCheckpointHandler(),
      config=ocp.JsonCheckpointHandler())).save(
          tmp_path / 'old', args=ocp.args.Composite(
              params=ocp.args.StandardSave(params),
              config=ocp.args.JsonSave(old)))
  hf = hf_timesformer(0, num_frames=2, image_size=32, patch_size=8,
                      hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64,
                      num_labels=3)
  original_pyth(tmp_path / 'model.pyth', 'divided')
  # The readers' own configs, before any fitting; the .pyth's head count
  # from the hint.
  loaded = {path: checkpoints.read_checkpoint(path, hint=config)[1]
            for path in (tmp_path / 'old', save_hf(hf, tmp_path / 'hf',
                                                   'safetensors'),
                         tmp_path / 'model.pyth', vit_files[1]['vit_npz'])}
  hand_made = ml_collections.ConfigDict({'model': config.model.to_dict()})
  loaded['by hand'] = tsformer_jax.load_checkpoint(tmp_path / 'old',
                                                   hand_made)[0]
  for source, got in loaded.items():
    assert [path for path, _ in fields(got)] == recipe, source
  old = loaded[tmp_path / 'old']
  assert (old.sharding.to_dict(), old.model.remat, old.data.resize) == (
      config.sharding.to_dict(), 'none', 'antialias')
  assert loaded['by hand'].data.resize == 'original'


def test_training_checkpoints_load(tmp_path):
  """A CheckpointManager's latest step, params inside a `state` item."""
  config = tiny_config('divided')
  params = random_params(config)
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints')
  for step in (10, 20):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(dict(
            step=np.int32(step),
            params=jax.tree.map(lambda x, s=step: x + s, params),
            opt_state={'mu': params})),
        config=ocp.args.JsonSave(config.to_dict())))
  manager.wait_until_finished()
  loaded_config, loaded = tsformer_jax.load_checkpoint(tmp_path /
                                                       'checkpoints')
  assert loaded_config.to_dict() == config.to_dict()
  np.testing.assert_array_equal(loaded['cls'], np.asarray(params['cls']) + 20)


def test_training_checkpoints_round_trip(tmp_path):
  """`checkpoints.training` restores a train state; its params load."""
  config = tiny_config('divided')
  params = random_params(config)
  state = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=optax.sgd(0.1, momentum=0.9))
  state = jax.tree.map(jnp.asarray, state.replace(
      step=7, opt_state=jax.tree.map(lambda x: x + 1, state.opt_state)))
  manager = checkpoints.training.checkpoint_manager(tmp_path, config)
  checkpoints.training.save(manager, state, config)
  manager.wait_until_finished()
  fresh = jax.tree.map(jnp.zeros_like, state)
  restored = checkpoints.training.restore(manager, fresh, 7)
  assert int(restored.step) == 7
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  loaded_config, loaded = tsformer_jax.load_checkpoint(tmp_path /
                                                       'checkpoints')
  assert loaded_config.to_dict() == config.to_dict()
  np.testing.assert_array_equal(loaded['cls'], params['cls'])


def test_errors_name_the_file_parameter_and_shapes(tmp_path):
  junk = tmp_path / 'weights.dat'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match=r'weights\.dat: not a torch\.save'):
    tsformer_jax.load_checkpoint(junk)
  with pytest.raises(ValueError, match='unknown checkpoint format'):
    tsformer_jax.load_checkpoint(tmp_path)
  np.savez(tmp_path / 'other.npz', x=np.zeros(3))
  with pytest.raises(ValueError, match=r"other\.npz: not an original ViT "
                     r"\.npz: 'embedding/kernel' is missing"):
    tsformer_jax.load_checkpoint(tmp_path / 'other.npz')
  torch.save({'a': torch.zeros(2)}, tmp_path / 'other.pth')
  with pytest.raises(ValueError, match=r"other\.pth: unknown checkpoint "
                     r"format.*\['a'\]"):
    tsformer_jax.load_checkpoint(tmp_path / 'other.pth')
  with pytest.raises(ValueError, match="Unknown checkpoint format 'onnx'"):
    tsformer_jax.load_checkpoint(junk, format='onnx')

  # A missing key: the file and the key.
  original_pyth(tmp_path / 'cut.pyth', 'divided',
                drop='model.blocks.1.temporal_fc.bias')
  with pytest.raises(ValueError, match=r"cut\.pyth does not fit.*missing "
                     r"\['model\.blocks\.1\.temporal_fc\.bias'\]"):
    tsformer_jax.load_checkpoint(tmp_path / 'cut.pyth', tiny_config())
  # A misshapen tensor: the file, the parameter and both shapes.
  state = dict(OriginalModel(tiny_config().model).state_dict())
  state['model.time_embed'] = torch.zeros(1, 4, 32)
  torch.save({'model_state': state}, tmp_path / 'bad.pyth')
  with pytest.raises(ValueError, match=r"bad\.pyth: parameter "
                     r"'model\.time_embed' has shape \[1, 4, 32\].*"
                     r"'time_embedding' needs \[1, 4, 64\]"):
    tsformer_jax.load_checkpoint(tmp_path / 'bad.pyth', tiny_config())
  # Weights that do not fit the config asked for: nothing at OUT.
  original_pyth(tmp_path / 'good.pyth', 'divided')
  out = tmp_path / 'out'
  assert cli.call(convert.main, [
      'convert', str(tmp_path / 'good.pyth'), str(out),
      config_file('divided'), '--config.model.mlp_dim=256']) == 1
  with pytest.raises(ValueError, match=r'good\.pyth does not fit config\.'
                     r'model: the checkpoint has .*mlp_dim=128.* but '
                     r'config\.model .*mlp_dim=256'):
    tsformer_jax.load_checkpoint(tmp_path / 'good.pyth', tiny_config(
        mlp_dim=256))
  with pytest.raises(ValueError, match="cannot load 'divided' weights into "
                     "a 'axial' model"):
    tsformer_jax.load_checkpoint(tmp_path / 'good.pyth', tiny_config('axial'))
  assert not out.exists()
  # Params that do not fit their config are never written.
  params = random_params(tiny_config('joint'))
  params['cls'] = np.zeros((1, 1, 32), np.float32)
  with pytest.raises(ValueError, match=r"'cls' has \[1, 1, 32\] but "
                     r"config\.model needs \[1, 1, 64\]"):
    checkpoints.save_checkpoint(out, tiny_config('joint'), params)
  assert not out.exists()


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
  def fail(self, directory, *args, **kwargs):
    os.makedirs(directory)
    (pathlib.Path(directory) / 'partial').write_text('half')
    raise OSError('disk full')
  monkeypatch.setattr(ocp.Checkpointer, 'save', fail)
  with pytest.raises(OSError, match='disk full'):
    checkpoints.save_checkpoint(tmp_path / 'out', tiny_config('joint'),
                                random_params(tiny_config('joint')))
  assert os.listdir(tmp_path) == []
