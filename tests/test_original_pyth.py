"""The original's .pyth read without flags: its training config `cfg`, the
head count by the ViT rule only, no change unasked, and one-line errors."""

import numpy as np
import pytest
import torch

import tsformer_jax
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import convert

from checkpoint_sources import OriginalModel
from checkpoint_sources import config_file
from checkpoint_sources import original_pyth
from checkpoint_sources import randomize
from checkpoint_sources import run_convert
from conftest import apply
from conftest import random_clips

# A ViT-Ti width (192: 3 heads) at 3 frames of 32 px and 7 classes: every
# size but the width differs from the defaults.
CFG = """\
TRAIN:
  DATASET: kinetics
DATA:
  NUM_FRAMES: {frames}
  TRAIN_CROP_SIZE: 32
  SAMPLING_RATE: 4
  MEAN: [0.5, 0.5, 0.5]
  STD: [0.25, 0.25, 0.25]
MODEL:
  ARCH: vit
  NUM_CLASSES: 7
TEST:
  NUM_ENSEMBLE_VIEWS: 2
  NUM_SPATIAL_CROPS: 1
TIMESFORMER:
  ATTENTION_TYPE: {attention_type}
"""
TYPES = dict(divided='divided_space_time', joint='joint_space_time',
             space_only='space_only')


def _model_config(scheme):
  config = config_lib.get_config(scheme, 'tiny')
  config.model.update(hidden_size=192, num_heads=3, mlp_dim=384, depth=1,
                      num_frames=3, num_classes=7, patch_size=16)
  return config


def _pyth(path, scheme, attention_type=None):
  config = _model_config(scheme)
  reference = randomize(OriginalModel(config.model), 0)
  torch.save({'epoch': 3, 'model_state': reference.state_dict(),
              'cfg': CFG.format(frames=3, attention_type=attention_type or
                                TYPES[scheme])}, path)
  return config, reference.model


@pytest.mark.parametrize('scheme', sorted(TYPES))
def test_cfg_and_weights_reproduce_the_model_without_flags(tmp_path, scheme):
  config, reference = _pyth(tmp_path / 'm.pyth', scheme)
  run_convert(tmp_path / 'm.pyth', tmp_path / 'out')
  loaded, params = tsformer_jax.load_checkpoint(tmp_path / 'out')
  assert loaded.model.to_dict() == config.model.to_dict()
  d = loaded.data
  assert (d.sampling_rate, d.mean, d.std, d.test_num_clips,
          d.test_num_crops) == (4, (0.5,) * 3, (0.25,) * 3, 2, 1)
  clips = random_clips(loaded, seed=1)
  with torch.no_grad():
    want = reference(torch.from_numpy(clips)).numpy()
  assert want.std() > 0.05
  np.testing.assert_allclose(
      apply(tsformer_jax.create_model(loaded), params, clips), want,
      atol=1e-4, rtol=0)


def test_a_cfg_that_contradicts_the_weights_is_refused(tmp_path):
  _pyth(tmp_path / 'm.pyth', 'divided', attention_type='joint_space_time')
  with pytest.raises(ValueError, match=(
      r"m\.pyth: its cfg says 'joint_space_time' but its weights are "
      r"'divided' attention\.$")):
    tsformer_jax.load_checkpoint(tmp_path / 'm.pyth')


def test_a_width_of_no_vit_size_needs_the_head_count(tmp_path, capsys):
  original_pyth(tmp_path / 'tiny.pyth', 'divided')  # Width 64.
  args = ['convert', str(tmp_path / 'tiny.pyth'), str(tmp_path / 'out')]
  assert cli.call(convert.main, args) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f'convert: error: {tmp_path / "tiny.pyth"}: the file does not record '
      'the number of heads, and width 64 is none of the ViT sizes [192, '
      '384, 768, 1024, 1280]: pass it, e.g. --config=configs/divided.py '
      "--config.model.num_heads=N (with the model's other sizes).")
  run_convert(*args[1:], config_file('divided'))  # The config tells it.


def test_a_truncated_pyth_says_so(tmp_path, capsys):
  _pyth(tmp_path / 'm.pyth', 'divided')
  data = (tmp_path / 'm.pyth').read_bytes()
  (tmp_path / 'cut.pyth').write_bytes(data[:len(data) // 2])
  assert cli.call(convert.main, ['convert', str(tmp_path / 'cut.pyth'),
                                 str(tmp_path / 'out')]) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f'convert: error: {tmp_path / "cut.pyth"}: truncated or corrupt: a zip '
      'archive (the torch.save format) whose end is missing.')
  torch.save({'model_state': {'w': torch.ones(100)}}, tmp_path / 'old.pyth',
             _use_new_zipfile_serialization=False)
  data = (tmp_path / 'old.pyth').read_bytes()
  (tmp_path / 'old_cut.pyth').write_bytes(data[:len(data) - 100])
  with pytest.raises(ValueError, match=r'old_cut\.pyth: truncated or '
                     r'corrupt \(storage \S+ ends past the end of the '
                     r'file\)\.$'):
    tsformer_jax.load_checkpoint(tmp_path / 'old_cut.pyth')


def test_a_misshapen_weight_shows_the_files_shape_beside_ours(tmp_path):
  config = _model_config('divided')
  state = randomize(OriginalModel(config.model), 0).state_dict()
  state['model.blocks.0.mlp.fc1.weight'] = torch.zeros(384, 96)
  torch.save({'model_state': state}, tmp_path / 'bad.pyth')
  with pytest.raises(ValueError, match=(
      r"bad\.pyth: parameter 'model\.blocks\.0\.mlp\.fc1\.weight' has shape "
      r"\[384, 96\] in the file, where 'block_0/mlp/fc1/kernel' needs "
      r"\[384, 192\] \(ours: \[192, 384\]\)\.$")):
    tsformer_jax.load_checkpoint(tmp_path / 'bad.pyth', config)


def test_nothing_changes_unasked_and_every_change_is_named(tmp_path, capsys):
  _pyth(tmp_path / 'm.pyth', 'divided')
  hr = ['--config=configs/divided.py:tiny', '--config.model.hidden_size=192',
        '--config.model.num_heads=3', '--config.model.mlp_dim=384',
        '--config.model.depth=1', '--config.model.patch_size=16']
  args = ['convert', str(tmp_path / 'm.pyth'), str(tmp_path / 'out'), *hr]
  assert cli.call(convert.main, args) == 1  # 4 frames, 10 classes.
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f'convert: error: {tmp_path / "m.pyth"} does not fit that config as it '
      'is; fitting it would change: resampled time_embedding from 3 to 4 '
      'frames (nearest). new head for 10 classes (checkpoint: 7). Pass '
      '--adapt (load_checkpoint(..., fit=True)) to change them.')
  assert cli.call(convert.main, args + ['--adapt']) == 0
  err = capsys.readouterr().err
  assert 'resampled time_embedding from 3 to 4 frames (nearest).' in err
  assert 'new head for 10 classes (checkpoint: 7).' in err
  # A new head alone is what --num_classes asks for.
  run_convert(tmp_path / 'm.pyth', tmp_path / 'five', '--num_classes=5')
  config, params = tsformer_jax.load_checkpoint(tmp_path / 'five')
  assert params['head']['bias'].shape == (5,) and config.model.num_frames == 3
