"""The folder dataset: your own videos, one subfolder per class.

Layouts and their errors, labels from the sorted folder names, any
container, TFDS preparation, and fine-tuning a converted checkpoint on a
folder of generated videos.
"""

import re
import time

import numpy as np
import pytest

from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import convert
from tsformer_jax import datasets
from tsformer_jax import train
from tsformer_jax.datasets import folder
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import tfds_builders
from tsformer_jax.datasets import video_writer

from conftest import counting_frames
from conftest import frame_indices

WRITERS = {'mp4': video_writer.write_mp4, 'webm': video_writer.write_webm}


def _config(data_dir, num_classes, arg='tiny,folder'):
  config = config_lib.get_config('divided', arg)
  config.data.data_dir = str(data_dir)
  config.model.num_classes = num_classes
  return config


def _write(root, relative_paths, frames=4):
  """A `counting_frames` video at each path, its container by extension;
  the n-th one `frames + n` frames long, so that each tells which it is."""
  for n, relative in enumerate(relative_paths):
    path = root / relative
    WRITERS[path.suffix[1:]](str(path), counting_frames(frames + n))


def _raises(error, message):
  return pytest.raises(error, match=f'^{re.escape(message)}$')


def test_the_recipe_leaves_the_class_count_to_the_command_line():
  config = config_lib.get_config('divided', 'folder')
  assert (config.data.dataset, config.model.num_classes, config.data.flip,
          config.data.sampling) == ('folder', 0, True, 'rate')
  assert datasets.get_dataset('folder').num_classes == 0
  demo = config_lib.get_config('divided', 'demo,folder')
  assert (demo.data.dataset, demo.optimizer.name, demo.data.eval_split) == (
      'folder', 'adamw', 'test')


def test_labels_come_from_the_sorted_class_folders(tmp_path):
  _write(tmp_path, ['train/zebra/b.webm', 'train/zebra/a.mp4',
                    'train/apple/x.mp4', 'train/mango/deep/c.mp4',
                    'val/mango/v.webm', 'val/apple/w.mp4'])
  (tmp_path / 'train' / 'apple' / '.hidden.mp4').write_bytes(b'')
  (tmp_path / 'train' / '.cache').mkdir()  # Not a class.
  (tmp_path / 'train' / 'notes.txt').write_text('not in a class folder')
  config = _config(tmp_path, 3)
  assert datasets.class_names(config) == ['apple', 'mango', 'zebra']
  source = datasets.get_source(config, 'train')
  assert [(e.path, e.label) for e in source.entries] == [
      (str(tmp_path / p), label) for p, label in [
          ('train/apple/x.mp4', 0), ('train/mango/deep/c.mp4', 1),
          ('train/zebra/a.mp4', 2), ('train/zebra/b.webm', 2)]]
  # Any container: frame counts and frames as written.
  lengths = {'x.mp4': 6, 'c.mp4': 7, 'a.mp4': 5, 'b.webm': 4}
  for index, entry in enumerate(source.entries):
    video, label = source[index]
    assert video.num_frames == lengths[entry.path.rsplit('/', 1)[1]]
    assert frame_indices(video.frames(np.array([3, 0]))) == [3, 0]
  # 'val' and 'test' read val/, which may lack a class.
  for split in ('val', 'test'):
    val = datasets.get_source(config, split)
    assert [(e.path.rsplit('/', 2)[1:], e.label) for e in val.entries] == [
        (['apple', 'w.mp4'], 0), (['mango', 'v.webm'], 1)]


def test_linked_folders_are_read_once_under_their_own_class(tmp_path):
  data = tmp_path / 'data'
  _write(data, ['train/alpha/a.mp4', 'train/beta/b.mp4'])
  _write(tmp_path, ['elsewhere/c.mp4'])
  beta = data / 'train' / 'beta'
  (beta / 'loop').symlink_to('..')  # Back up to train/: a loop.
  (beta / 'also_alpha').symlink_to('../alpha')  # Another class.
  (beta / 'linked').symlink_to(tmp_path / 'elsewhere')  # Linked in: read.
  source = datasets.get_source(_config(data, 2), 'train')
  assert [(e.path, e.label) for e in source.entries] == [
      (str(data / p), label) for p, label in [
          ('train/alpha/a.mp4', 0), ('train/beta/b.mp4', 1),
          ('train/beta/linked/c.mp4', 1)]]


def test_layout_errors_name_the_layout(tmp_path):
  layout = (f'{{data_dir}}/train/{{class}}/* and {{data_dir}}/val/{{class}}/*.'
            f' {folder.HOW_TO}')
  config = _config(tmp_path, 2)
  with _raises(FileNotFoundError, f'Dataset folder is missing val, train in '
               f'{str(tmp_path)!r}. It expects {layout}'):
    datasets.get_source(config, 'test')
  with _raises(FileNotFoundError, f'{tmp_path}/train is missing: the folder '
               f'dataset expects {layout}'):
    datasets.class_names(config)
  (tmp_path / 'train').mkdir()
  (tmp_path / 'val').mkdir()
  with _raises(FileNotFoundError, f'{tmp_path}/train holds no class folder: '
               f'the folder dataset expects {layout}'):
    datasets.get_source(config, 'train')
  with _raises(FileNotFoundError, 'config.data.data_dir is empty: set it to '
               'the folder of folder (e.g. --config.data.data_dir=/data/'
               f'folder), which should hold {layout}'):
    datasets.get_source(_config('', 2), 'train')
  with _raises(FileNotFoundError, 'config.data.data_dir is empty: set it to '
               f'the folder of your videos, which should hold {layout}'):
    datasets.class_names(_config('', 2))
  _write(tmp_path, ['train/cat/a.mp4', 'train/dog/b.mp4', 'val/cow/c.mp4',
                    'val/dog/d.mp4', 'val/ant/e.mp4'])
  with _raises(ValueError, f"{tmp_path}/val has class folders that "
               f"{tmp_path}/train lacks: ['ant', 'cow']. The classes are the "
               'folders of train/; add those there, or remove them here.'):
    datasets.get_source(config, 'test')
  for count in (0, 3):
    with _raises(ValueError, f'The folder dataset {str(tmp_path)!r} has 2 '
                 f'classes, but config.model.num_classes is {count}: set '
                 '--config.model.num_classes=2.'):
      datasets.get_source(_config(tmp_path, count), 'train')
  (tmp_path / 'train' / 'dog' / 'b.mp4').unlink()
  (tmp_path / 'train' / 'cat' / 'a.mp4').unlink()
  with _raises(ValueError, f'{tmp_path}/train lists no videos.'):
    datasets.get_source(config, 'train')


def test_a_folder_prepares_as_tfds_without_a_class_count(tmp_path, caplog):
  data = tmp_path / 'videos'
  _write(data, ['train/b/1.mp4', 'train/a/2.webm', 'train/c/3.mp4',
                'val/c/4.mp4'])
  config = config_lib.get_config('divided', 'tiny,folder')
  config.data.update(data_dir=str(data), tfds_dir=str(tmp_path / 'tfds'))
  assert config.model.num_classes == 0  # prepare reads no model.
  # Every frame kept (the files are 30 fps), so that counts tell files.
  directory = tfds_builders.prepare(config, fps=30.0, num_workers=1)
  assert directory == str(tmp_path / 'tfds' / 'encoded_videos' / 'folder' /
                          '2.0.0')
  config.data.format = 'tfds'
  with _raises(ValueError, f'The prepared {directory!r} has 3 classes, but '
               'config.model.num_classes is 0: set '
               '--config.model.num_classes=3.'):
    datasets.get_source(config, 'train')
  config.model.num_classes = 3
  train_source = datasets.get_source(config, 'train')
  assert train_source.class_names == ['a', 'b', 'c']
  assert [label for _, label in (train_source[i] for i in range(3))] == [
      0, 1, 2]
  assert [train_source[i][0].num_frames for i in range(3)] == [5, 4, 6]
  # A job on the prepared data needs no data_dir: its checkpoints take the
  # names that were prepared with it.
  no_dir = config.copy_and_resolve_references()
  no_dir.data.data_dir = ''
  assert train._with_class_names(no_dir, train_source).data.class_names == (
      'a', 'b', 'c')
  # Stored at the default short side, 320: HR's scales would enlarge the
  # frames, so HR's default is its largest scale, and reading says so.
  assert not [r for r in caplog.records if 'enlarged' in r.getMessage()]
  hr = config.copy_and_resolve_references()
  hr.data.train_scales = config_lib.get_config(
      'divided', 'hr').data.train_scales
  assert tfds_builders.default_short_side(hr) == 512
  datasets.get_source(hr, 'train')
  assert [r.getMessage() for r in caplog.records
          if 'enlarged' in r.getMessage()] == [
              f'{directory} was prepared with frames of short side 320 at '
              "most, below this config's training scales (448, 512): its "
              'frames are enlarged. Prepare it again with --short_side=512, '
              'into another --out.']
  video, label = datasets.get_source(config, 'test')[0]
  assert (label, video.num_frames) == (2, 7)
  # Another folder is not taken for the one prepared there.
  other = tmp_path / 'other'
  _write(other, ['train/a/1.mp4', 'val/a/2.mp4'])
  config.data.data_dir = str(other)
  with pytest.raises(ValueError, match=(
      f"already holds this dataset, prepared with .*'data_dir': '{data}'.*"
      f"asked for .*'data_dir': '{other}'")):
    tfds_builders.prepare(config, num_workers=1)


# Generated videos per split of the fine-tuning folder.
FINE_TUNE_VIDEOS = {'train': 128, 'val': 64}


@pytest.mark.slow
def test_a_converted_checkpoint_fine_tunes_on_a_folder(demo_workdir,
                                                       tmp_path):
  """The documented path: a checkpoint with another head (here the demo
  model converted to a 400-class head, as a Kinetics-400 one) fine-tuned on
  a folder of synthetic_motion mp4s written as class folders."""
  data = tmp_path / 'videos'
  for split, count in FINE_TUNE_VIDEOS.items():
    for index in range(count):
      frames, label = synthetic_motion.generate(
          {'train': 'train', 'val': 'test'}[split], index)
      video_writer.write_mp4(str(
          data / split / synthetic_motion.CLASSES[label] / f'{index}.mp4'),
          frames)
  checkpoint = tmp_path / 'kinetics_like'
  assert cli.call(convert.main, [
      'convert', str(demo_workdir / 'checkpoints'), str(checkpoint),
      '--num_classes=400']) == 0
  config = _config(data, 2, arg='demo,folder')
  config.init_from.path = str(checkpoint)
  # The folders' sorted order, not synthetic_motion's.
  assert datasets.class_names(config) == sorted(synthetic_motion.CLASSES)
  start = time.time()
  results = train.train_and_evaluate(config, str(tmp_path / 'work'))
  seconds = time.time() - start
  # 8 epochs of 4 batches of 32: measured top-1 1.0 in 26 s.
  assert results['step'] == 32 and results['skipped_videos'] == 0
  assert results['eval_top1'] >= 0.9, (results, seconds)
  # The checkpoint does it: from random weights, chance (measured 0.48).
  config.init_from.path = 'scratch'
  scratch = train.train_and_evaluate(config, str(tmp_path / 'scratch'))
  assert scratch['eval_top1'] < 0.75, scratch
