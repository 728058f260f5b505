"""Class names travel with the weights: HF id2label, a names file for a
.pyth, training checkpoints; the dataset's only where a checkpoint has none."""

import json

import jax
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import convert
from tsformer_jax import evaluation
from tsformer_jax import predict
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_writer

from checkpoint_sources import hf_timesformer
from checkpoint_sources import original_pyth
from checkpoint_sources import run_convert
from checkpoint_sources import save_hf
from conftest import tiny_params

TINY_HF = dict(num_frames=4, image_size=32, patch_size=8, hidden_size=64,
               num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=128)


def _hf_dir(tmp_path, names):
  model = hf_timesformer(0, **TINY_HF, num_labels=len(names),
                         id2label=dict(enumerate(names)))
  return save_hf(model, tmp_path / 'hf', 'safetensors')


def test_hf_id2label_is_kept_through_convert_and_predict(tmp_path, capsys):
  # 400 classes that are not Kinetics: they must not be called Kinetics.
  names = [f'action_{i:03d}' for i in range(400)]
  run_convert(_hf_dir(tmp_path, names), tmp_path / 'ours')
  config, _ = tsformer_jax.load_checkpoint(str(tmp_path / 'ours'))
  assert list(config.data.class_names) == names
  assert evaluation.label_names(config) == names
  video = tmp_path / 'clip.mp4'
  video_writer.write_mp4(str(video), synthetic_motion.generate('test', 0)[0])
  capsys.readouterr()
  assert cli.call(predict.main, ['predict', f'--checkpoint={tmp_path}/ours',
                                 str(video), '--json', '--top_k=3']) == 0
  top = json.loads(capsys.readouterr().out)['videos'][0]['top_k']
  assert [t['label'] for t in top] == [names[t['index']] for t in top]


def test_default_hf_labels_fall_back_to_the_dataset(tmp_path):
  model = hf_timesformer(0, **TINY_HF, num_labels=400)  # LABEL_0, ...
  config, _ = tsformer_jax.load_checkpoint(
      str(save_hf(model, tmp_path / 'hf', 'safetensors')))
  assert config.data.class_names == ()
  assert evaluation.label_names(config)[:2] == ['abseiling',
                                                'air drumming']


def test_a_new_head_drops_the_checkpoints_names(tmp_path):
  names = [f'c{i}' for i in range(5)]
  run_convert(_hf_dir(tmp_path, names), tmp_path / 'ours', '--num_classes=3')
  config, params = tsformer_jax.load_checkpoint(str(tmp_path / 'ours'))
  assert params['head']['kernel'].shape[-1] == 3
  assert config.data.class_names == ()
  with pytest.raises(ValueError, match=(
      r'^The model has 3 classes but its dataset kinetics400 400 class '
      r'names: give the checkpoint its names \(python -m tsformer_jax.'
      r'convert SRC OUT --class_names=FILE, one name per line\).$')):
    evaluation.label_names(config)


@pytest.mark.slow
def test_predict_without_names_or_their_dataset_shows_class_indices(
    tmp_path, capsys):
  # Trained on a folder that is gone: a warning, then indices as labels.
  config = config_lib.get_config('divided', 'tiny,folder')
  config.model.num_classes = 3
  config.data.data_dir = str(tmp_path / 'moved_away')
  checkpoint = str(tmp_path / 'ckpt')
  checkpoints.save_checkpoint(checkpoint, config,
                              tiny_params('divided', num_classes=3))
  video = tmp_path / 'clip.mp4'
  video_writer.write_mp4(str(video), synthetic_motion.generate('test', 0)[0])
  capsys.readouterr()
  assert cli.call(predict.main, ['predict', f'--checkpoint={checkpoint}',
                                 str(video), '--json']) == 0
  captured = capsys.readouterr()
  assert captured.err.strip().splitlines() == [
      f"predict: warning: {checkpoint} carries no class names and its "
      f"dataset's (folder, {tmp_path}/moved_away) cannot be read: showing "
      "class indices. To name them: python -m tsformer_jax.convert "
      f"{checkpoint} OUT --class_names=FILE."]
  top = json.loads(captured.out)['videos'][0]['top_k']
  assert len(top) == 3
  assert [t['label'] for t in top] == [str(t['index']) for t in top]


def test_a_pyth_takes_a_names_file(tmp_path):
  original_pyth(tmp_path / 'model.pyth', 'divided')  # 10 classes (tiny).
  names = tmp_path / 'names.txt'
  names.write_text(''.join(f'class {i}\n' for i in range(10)))
  run_convert(tmp_path / 'model.pyth', tmp_path / 'ours',
              '--config=configs/divided.py:tiny', f'--class_names={names}')
  config, _ = tsformer_jax.load_checkpoint(str(tmp_path / 'ours'))
  assert evaluation.label_names(config) == [f'class {i}' for i in range(10)]


def test_a_names_file_of_the_wrong_length_names_both_counts(tmp_path,
                                                            capsys):
  original_pyth(tmp_path / 'model.pyth', 'divided')
  names = tmp_path / 'names.txt'
  names.write_text('a\nb\nc\n')
  status = cli.call(convert.main, [
      'convert', str(tmp_path / 'model.pyth'), str(tmp_path / 'ours'),
      '--config=configs/divided.py:tiny', f'--class_names={names}'])
  assert status == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      'convert: error: 3 class names for a model of 10 classes.')
  assert not (tmp_path / 'ours').exists()


def test_saved_names_survive_orbax_and_fine_tuning_configs(tmp_path):
  config = config_lib.with_class_names(
      config_lib.get_config('divided', 'tiny'), 'abcdefghij')
  params = tsformer_jax.init_params(config, jax.random.key(0))
  checkpoints.save_checkpoint(str(tmp_path / 'c'), config, params)
  loaded, _ = tsformer_jax.load_checkpoint(str(tmp_path / 'c'))
  assert ''.join(loaded.data.class_names) == 'abcdefghij'
  # Fine-tuning into the same head keeps them; another head drops them.
  same = config_lib.get_config('divided', 'tiny')
  kept, _ = tsformer_jax.load_checkpoint(str(tmp_path / 'c'), same)
  assert ''.join(kept.data.class_names) == 'abcdefghij'
  same.model.num_classes = 4
  other, out = tsformer_jax.load_checkpoint(str(tmp_path / 'c'), same)
  assert other.data.class_names == () and out['head']['bias'].shape == (4,)
  np.testing.assert_array_equal(out['norm']['scale'],
                                np.asarray(params['norm']['scale']))
