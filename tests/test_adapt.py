"""Fitting weights to a config: resampling, inflation, new heads."""

import logging
import math

import jax
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import attention
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import convert
from tsformer_jax import model as model_lib

from checkpoint_sources import VIT_FORMATS
from checkpoint_sources import config_file
from checkpoint_sources import hf_timesformer
from checkpoint_sources import run_convert
from checkpoint_sources import save_hf
from checkpoint_sources import save_vits
from checkpoint_sources import torch_nearest_1d
from checkpoint_sources import torch_nearest_2d
from conftest import apply
from conftest import random_clips
from conftest import tiny_config

SCHEMES = sorted(attention.SCHEMES)


@pytest.fixture(scope='module')
def vit_files(tmp_path_factory):
  return save_vits(tmp_path_factory.mktemp('vit'))


@pytest.mark.parametrize('old,new', [((14, 14), (28, 28)), ((4, 4), (7, 7)),
                                     ((7, 7), (5, 5)), ((3, 5), (6, 4)),
                                     ((14, 14), (9, 13))])
def test_resampling_is_torch_nearest_interpolation(old, new):
  pos = np.random.default_rng(0).normal(
      size=(1, 1 + old[0] * old[1], 8)).astype(np.float32)
  got = checkpoints.resample_pos_embedding(pos, old, new)
  np.testing.assert_array_equal(got[:, :1], pos[:, :1])
  np.testing.assert_array_equal(got[:, 1:],
                                torch_nearest_2d(pos[:, 1:], old, new))
  got = checkpoints.resample_pos_embedding(pos, old, new, mode='1d')
  np.testing.assert_array_equal(
      got[:, 1:], torch_nearest_1d(pos[:, 1:], new[0] * new[1]))
  for frames in (1, 3, 16, 96):
    time = pos[:, :8]
    np.testing.assert_array_equal(
        checkpoints.resample_time_embedding(time, frames),
        torch_nearest_1d(time, frames))


def test_checkpoint_into_other_frames_and_resolution(tmp_path, capsys):
  """HF weights at 2 x 16 px into the tiny config's 4 x 32 px."""
  hf = hf_timesformer(0, num_frames=2, image_size=16, patch_size=8,
                      hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128,
                      num_labels=10)
  src = save_hf(hf, tmp_path / 'hf', 'safetensors')
  pos = hf.timesformer.embeddings.position_embeddings.detach().numpy()
  time = hf.timesformer.embeddings.time_embeddings.detach().numpy()
  # Resampled only when asked for, and then every change is named.
  assert cli.call(convert.main, ['convert', str(src), str(tmp_path / 'no'),
                                 config_file('divided')]) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f'convert: error: {src} does not fit that config as it is; fitting it '
      'would change: resampled pos_embedding from (2, 2) to (4, 4) patches '
      '(nearest, 2d). resampled time_embedding from 2 to 4 frames '
      '(nearest). Pass --adapt (load_checkpoint(..., fit=True)) to change '
      'them.')
  assert not (tmp_path / 'no').exists()
  # The run's own stderr handler went with it: records propagate again.
  package_logger = logging.getLogger('tsformer_jax')
  assert package_logger.propagate and not package_logger.handlers
  for mode in ('2d', '1d'):
    out = tmp_path / mode
    run_convert(src, out, config_file('divided'), f'--pos_resize={mode}',
                '--adapt')
    assert f'resampled pos_embedding from (2, 2) to (4, 4) patches ' \
        f'(nearest, {mode})' in capsys.readouterr().err
    config, params = tsformer_jax.load_checkpoint(out)
    assert (config.model.num_frames, tuple(config.model.image_size)) == (
        4, (32, 32))
    want = (torch_nearest_2d(pos[:, 1:], (2, 2), (4, 4)) if mode == '2d'
            else torch_nearest_1d(pos[:, 1:], 16))
    np.testing.assert_array_equal(params['pos_embedding'][:, 1:], want)
    np.testing.assert_array_equal(params['time_embedding'],
                                  torch_nearest_1d(time, 4))
  direct = checkpoints.params_from_hf_state_dict(
      hf.state_dict(), checkpoints.config_from_hf(hf.config.to_dict()))
  np.testing.assert_array_equal(params['block_1']['time_attention']['fc'][
      'kernel'], direct['block_1']['time_attention']['fc']['kernel'])
  logits = apply(tsformer_jax.create_model(config), params,
                 random_clips(config))
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


@pytest.mark.parametrize('variant,frames,patches', [('hr', 16, 28 * 28),
                                                    ('l', 96, 14 * 14)])
def test_base_weights_fit_hr_and_l(variant, frames, patches):
  base = config_lib.get_config('divided', 'base')
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(
      lambda: tsformer_jax.init_params(base, jax.random.key(0)))
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  params['pos_embedding'] = rng.normal(size=(1, 197, 768)).astype(np.float32)
  params['time_embedding'] = rng.normal(size=(1, 8, 768)).astype(np.float32)
  target = config_lib.get_config('divided', variant)
  got = checkpoints.adapt_params(params, base, target)
  assert got['pos_embedding'].shape == (1, 1 + patches, 768)
  np.testing.assert_array_equal(
      got['pos_embedding'][:, 1:],
      torch_nearest_2d(params['pos_embedding'][:, 1:], (14, 14),
                       (math.isqrt(patches),) * 2))
  np.testing.assert_array_equal(
      got['time_embedding'],
      torch_nearest_1d(params['time_embedding'], frames))


# ----------------------------------------------------------------------------
# ImageNet ViT into every scheme

@pytest.mark.parametrize('fmt', VIT_FORMATS)
@pytest.mark.parametrize('scheme', SCHEMES)
def test_vit_loads_into_every_scheme(vit_files, fmt, scheme):
  """Spatial weights copied, earlier steps copies with zero fc, time zero."""
  _, files = vit_files
  assert checkpoints.detect_format(files[fmt]) == fmt
  config = tiny_config(scheme)
  loaded, params = tsformer_jax.load_checkpoint(files[fmt], config)
  _, image = tsformer_jax.load_checkpoint(files[fmt], tiny_config(
      'space_only', num_frames=1))
  steps = attention.get_scheme(scheme).steps
  for i in range(config.model.depth):
    block, vit = params[f'block_{i}'], image[f'block_{i}']['space_attention']
    for step in steps:
      got = block[f'{step.grouping}_attention']
      for part in ('norm', 'qkv', 'proj'):
        for name, value in vit[part].items():
          np.testing.assert_array_equal(got[part][name], value)
      if step.output_fc:
        assert not np.any(got['fc']['kernel']) and not np.any(
            got['fc']['bias'])
  for name in ('embedding', 'norm', 'head'):
    for leaf, value in image[name].items():
      np.testing.assert_array_equal(params[name][leaf], value)
  np.testing.assert_array_equal(params['pos_embedding'],
                                image['pos_embedding'])
  if scheme != 'space_only':
    assert params['time_embedding'].shape == (1, 4, 64)
    assert not np.any(params['time_embedding'])
  checkpoints.check_params(params, loaded)


@pytest.mark.parametrize('scheme', SCHEMES)
def test_inflating_warns_where_the_image_model_is_not_kept(vit_files, scheme,
                                                            caplog):
  """Only divided and space_only start as the image model (equality: see
  test_checkpoint_formats' test_vit_init_is_the_image_model_frame_by_frame);
  the others' last step does not attend over one frame."""
  _, files = vit_files
  with caplog.at_level(logging.WARNING,
                       logger='tsformer_jax.checkpoints.adapt'):
    tsformer_jax.load_checkpoint(files['vit_npz'], tiny_config(scheme))
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  if scheme in checkpoints.IMAGE_MODEL_SCHEMES:
    assert not warnings
  else:
    last = attention.get_scheme(scheme).steps[-1].grouping
    assert warnings == [
        f"{files['vit_npz']}: inflated into {scheme}, the model does not "
        f'start as the image model: its last step ({last} attention) does '
        'not attend over exactly one frame. Only divided and space_only '
        'start as the image model.']


def test_init_params_from_config(vit_files, monkeypatch):
  _, files = vit_files
  config = tiny_config('axial')
  assert config.init_from.path == 'scratch'  # The tiny variant's.
  monkeypatch.setattr(model_lib, 'init_params',
                      lambda c, rng: ('fresh', c, rng))
  rng = jax.random.key(0)
  assert checkpoints.init_params_from(config, rng) == ('fresh', config, rng)
  monkeypatch.undo()
  config.init_from.path = str(files['vit_timm'])
  config.init_from.format = 'vit_timm'
  params = checkpoints.init_params_from(config, jax.random.key(0))
  np.testing.assert_array_equal(
      params['block_0']['time_attention']['qkv']['kernel'],
      params['block_0']['height_attention']['qkv']['kernel'])
  assert isinstance(params['cls'], jax.Array)
