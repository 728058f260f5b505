"""Multi-label data: several classes per video, from listings, Charades'
frame lists and the generated synthetic_attributes, through the input
pipeline and TFDS preparation as uint8 multi-hot labels.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import datasets
from tsformer_jax import frame_files
from tsformer_jax import input_pipeline as ip
from tsformer_jax.datasets import charades
from tsformer_jax.datasets import folder
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import tfds_builders
from tsformer_jax.datasets import video_writer

from conftest import counting_frames
from conftest import frame_indices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED, BLUE = np.array([230, 60, 60]), np.array([60, 90, 230])


def _raises(error, message):
  return pytest.raises(error, match=f'^{re.escape(message)}$')


def _one_line_for_the_user(error_info):
  """What `main` and `prepare` print: one line (`cli.expected`)."""
  assert cli.expected(error_info.value), error_info.value
  assert '\n' not in str(error_info.value)


class _First:
  """The first `n` videos of `source`, its attributes kept."""

  def __init__(self, source, n):
    self.source, self.n = source, n
    self.multi_label, self.num_classes = source.multi_label, source.num_classes

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return self.source[index]


# sha256 (first 16 hex digits) of synthetic_motion videos as generated
# before the generator was shared with synthetic_attributes.
SYNTHETIC_MOTION = {('train', 0): '28783fe8c42ed6ea',
                    ('train', 7): 'aec76ccfdf5a353d',
                    ('test', 1): 'c9b2a9e05519397e',
                    ('test', 100): '3e6c96eeedff1eaf'}


def test_synthetic_motion_is_unchanged_by_the_shared_generator():
  for (split, index), digest in SYNTHETIC_MOTION.items():
    frames, _ = synthetic_motion.generate(split, index)
    assert hashlib.sha256(frames.tobytes()).hexdigest()[:16] == digest


def _square(frame):
  """Pixel count, centroid (y, x) and colour ('red', 'blue') of the
  square in `frame`: the pixels within 80 (summed over channels) of a
  colour, the noise being 8."""
  found = {}
  for name, colour in (('red', RED), ('blue', BLUE)):
    mask = np.abs(frame.astype(int) - colour).sum(-1) < 80
    if mask.sum():
      found[name] = mask
  (name, mask), = found.items()
  y, x = np.nonzero(mask)
  return mask.sum(), np.array([y.mean(), x.mean()]), name


def test_attributes_are_independent_and_rendered_as_named():
  targets = []
  for index in range(64):
    frames, target = synthetic_motion.generate_attributes('train', index)
    assert target.dtype == np.uint8 and target.shape == (3,)
    targets.append(target)
    first, last = _square(frames[0]), _square(frames[-1])
    red_first, grows, moves = target.astype(bool)
    assert (first[2], last[2]) == (('red', 'blue') if red_first
                                   else ('blue', 'red'))
    # 6 -> 14 pixels a side: 36 -> 196 pixels, or back.
    assert (first[0], last[0]) == ((36, 196) if grows else (196, 36))
    # A still square grows about its centre (within rounding); a moving
    # one travels 1.2 pixels a frame, 18 in all.
    shift = np.linalg.norm(last[1] - first[1])
    assert (17 < shift < 19) if moves else (shift < 1), (index, shift)
  # Every subset, none and all included, within 64 videos.
  assert len({tuple(t) for t in targets}) == 8
  all_train = np.stack([synthetic_motion.generate_attributes('train', i)[1]
                        for i in range(synthetic_motion.SPLITS['train'])])
  # Fair and independent coins: 2048 draws, 4 standard deviations.
  np.testing.assert_allclose(all_train.mean(0), 0.5, atol=0.045)
  assert np.abs(np.corrcoef(all_train.T.astype(float))
                - np.eye(3)).max() < 0.09


def test_the_attributes_demo_config_and_its_batches():
  config = config_lib.get_config('divided', 'demo,synthetic_attributes')
  assert (config.data.dataset, config.model.num_classes, config.model.loss,
          config.init_from.path) == ('synthetic_attributes', 3, 'sigmoid',
                                     config_lib.SCRATCH)
  assert config_lib.get_config('divided', 'demo').model.loss == 'softmax'
  assert datasets.class_names(config) == ['red_then_blue', 'grows', 'moves']
  source = datasets.get_source(config, 'train')
  assert datasets.is_multi_label(source) and len(source) == 2048
  spec = clip_lib.clip_spec(config)
  batch = next(ip.train_batches(source, spec, 4, seed=3, num_workers=0))
  order = ip.epoch_order(3, 0, len(source))[:4]
  assert batch['labels'].dtype == np.uint8
  np.testing.assert_array_equal(batch['labels'],
                                [source[int(i)][1] for i in order])
  test = datasets.get_source(config, 'test')
  # 5 videos in batches of 4: the second batch holds one, three padded.
  batches = list(ip.eval_batches(_First(test, 5), spec, 4, num_workers=0))
  labels = np.concatenate([b['labels'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert labels.shape == (8, 3) and labels.dtype == np.uint8
  np.testing.assert_array_equal(mask, [True] * 5 + [False] * 3)
  np.testing.assert_array_equal(labels[:5], [test[i][1] for i in range(5)])
  assert not labels[5:].any()


def test_single_label_batches_keep_their_int32_labels():
  config = config_lib.get_config('divided', 'demo')
  source = datasets.get_source(config, 'train')
  assert not datasets.is_multi_label(source)
  batch = next(ip.train_batches(source, clip_lib.clip_spec(config), 4,
                                seed=3, num_workers=0))
  order = ip.epoch_order(3, 0, len(source))[:4]
  assert batch['labels'].dtype == np.int32 and batch['labels'].shape == (4,)
  assert batch['labels'].tolist() == [source[int(i)][1] for i in order]


def test_softmax_loss_on_multi_label_data_is_one_line():
  config = config_lib.get_config('divided', 'demo,synthetic_attributes')
  config.model.loss = 'softmax'
  with _raises(ValueError, 'synthetic_attributes has several labels per '
               "video, but config.model.loss is 'softmax' (one class per "
               'video): set --config.model.loss=sigmoid.') as e:
    datasets.get_source(config, 'train')
  _one_line_for_the_user(e)
  # Sigmoid on single-label data is allowed (one-hot targets).
  config = config_lib.get_config('divided', 'demo')
  config.model.loss = 'sigmoid'
  assert len(datasets.get_source(config, 'test')) == 256


def _write_listed_folder(root, val_listing='val.jsonl'):
  """Four short videos (n-th `counting_frames(4 + n)`), classes.txt, a
  CSV train listing (labels by name and index, one with none) and a val
  listing."""
  for n, name in enumerate(['a.mp4', 'sub/b.mp4', 'c.webm', 'd.mp4']):
    path = root / 'videos' / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write = video_writer.write_webm if name.endswith('webm') else (
        video_writer.write_mp4)
    write(str(path), counting_frames(4 + n))
  (root / 'classes.txt').write_text('cat\ndog\nbird\n')
  (root / 'train.csv').write_text(
      '# path labels\nvideos/a.mp4 cat,bird\nvideos/sub/b.mp4 1\n'
      'videos/c.webm\n')
  if val_listing.endswith('.jsonl'):
    (root / val_listing).write_text(
        json.dumps({'path': 'videos/d.mp4', 'labels': ['dog', 'cat']}) +
        '\n')
  else:
    (root / val_listing).write_text('videos/d.mp4 dog,cat\n')


def _folder_config(data_dir, num_classes=3, arg='tiny,folder'):
  config = config_lib.get_config('divided', arg)
  config.data.data_dir = str(data_dir)
  config.model.update(num_classes=num_classes, loss='sigmoid')
  return config


def test_a_folder_with_listings_gives_multi_hot_labels(tmp_path):
  _write_listed_folder(tmp_path)
  config = _folder_config(tmp_path)
  assert datasets.class_names(config) == ['cat', 'dog', 'bird']
  train = datasets.get_source(config, 'train')
  assert datasets.is_multi_label(train) and train.num_classes == 3
  assert [e.path for e in train.entries] == [
      str(tmp_path / 'videos' / n) for n in ('a.mp4', 'sub/b.mp4', 'c.webm')]
  np.testing.assert_array_equal(train.labels, [[1, 0, 1], [0, 1, 0],
                                               [0, 0, 0]])
  for index, length in enumerate([4, 5, 6]):
    video, label = train[index]
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, train.labels[index])
    assert video.num_frames == length
    assert frame_indices(video.frames(np.array([2, 0]))) == [2, 0]
  for split in ('val', 'test'):
    val = datasets.get_source(config, split)
    np.testing.assert_array_equal(val.labels, [[1, 1, 0]])
  config.model.loss = 'softmax'
  with pytest.raises(ValueError, match='set --config.model.loss=sigmoid'):
    datasets.get_source(config, 'train')


def test_listing_errors_are_one_line(tmp_path):
  _write_listed_folder(tmp_path, val_listing='val.csv')
  config = _folder_config(tmp_path)
  (tmp_path / 'train.csv').write_text(
      'videos/a.mp4 cat\n\nvideos/sub/b.mp4 dog,horse\n')
  with _raises(ValueError, f"{tmp_path}/train.csv:3: unknown label 'horse'; "
               "a label is one of the 3 class names (e.g. ['cat', 'dog', "
               "'bird']) or an index below 3. Fix the line, or add the "
               'class.') as e:
    datasets.get_source(config, 'train')
  _one_line_for_the_user(e)
  (tmp_path / 'val.jsonl').write_text('')
  with _raises(ValueError, f'{tmp_path} holds both of val.csv and val.jsonl:'
               ' the folder dataset expects one of them, and '
               f'{folder.LISTING_LAYOUT}. {folder.LISTING_HOW_TO}') as e:
    datasets.get_source(config, 'val')
  _one_line_for_the_user(e)
  (tmp_path / 'train.csv').unlink()
  with _raises(FileNotFoundError, 'Dataset folder is missing train.csv or '
               f'train.jsonl in {str(tmp_path)!r}. It expects '
               f'{folder.LISTING_LAYOUT}. {folder.LISTING_HOW_TO}') as e:
    datasets.get_source(config, 'train')
  _one_line_for_the_user(e)
  with _raises(ValueError, f'The folder dataset {str(tmp_path)!r} has 3 '
               'classes, but config.model.num_classes is 2: set '
               '--config.model.num_classes=3.'):
    datasets.get_source(_folder_config(tmp_path, 2), 'val')


@pytest.mark.slow
def test_main_reports_an_unknown_label_in_one_line(tmp_path):
  _write_listed_folder(tmp_path)
  (tmp_path / 'train.csv').write_text('videos/a.mp4 cat\nvideos/c.webm owl\n')
  result = subprocess.run(
      [sys.executable, '-m', 'tsformer_jax.main',
       '--config=configs/divided.py:tiny,folder',
       f'--config.data.data_dir={tmp_path}', '--config.model.num_classes=3',
       '--config.model.loss=sigmoid', f'--workdir={tmp_path / "work"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(f'main: error: {tmp_path}/train.csv:2: '
                              "unknown label 'owl'"), result.stderr
  assert 'Traceback' not in result.stderr


def test_a_listed_folder_prepares_as_tfds_and_reads_back(tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  _write_listed_folder(data)
  config = _folder_config(data)
  config.data.tfds_dir = str(tmp_path / 'tfds')
  files = {s: datasets.get_source(config, s) for s in ('train', 'test')}
  # Every frame kept (the files are 30 fps), so that counts tell files.
  directory = tfds_builders.prepare(config, fps=30.0, num_workers=1)
  config.data.format = 'tfds'
  for split, file_source in files.items():
    prepared = datasets.get_source(config, split)
    assert datasets.is_multi_label(prepared)
    assert prepared.class_names == ['cat', 'dog', 'bird']
    np.testing.assert_array_equal(prepared.labels, file_source.labels)
    for index in range(len(prepared)):
      video, label = prepared[index]
      assert label.dtype == np.uint8
      np.testing.assert_array_equal(label, file_source.labels[index])
      assert video.num_frames == file_source[index][0].num_frames
  # The class lists, as the metadata stores them.
  metadata = datasets.get_source(config, 'train').split_metadata
  assert metadata['videos']['label'] == [[0, 2], [1], []]
  assert metadata['max_label'] == 2
  assert directory.endswith('encoded_videos/folder/2.0.0')
  config.model.loss = 'softmax'
  with pytest.raises(ValueError, match='set --config.model.loss=sigmoid'):
    datasets.get_source(config, 'train')


def _write_charades(root, videos, frame_size=(36, 48)):
  """A Charades tree: `videos` is [(id, [labels of each frame])]; frame k
  of video n is a grey JPEG of level 16 * n + 8 * k."""
  lines = ['original_vido_id video_id frame_id path labels']
  for n, (video, frame_labels) in enumerate(videos):
    (root / charades.FRAMES_DIR / video).mkdir(parents=True)
    for k, labels in enumerate(frame_labels):
      name = f'{video}/{video}-{k + 1:06d}.jpg'
      level = 16 * n + 8 * k
      PIL.Image.fromarray(np.full(frame_size + (3,), level, np.uint8)).save(
          root / charades.FRAMES_DIR / name, quality=95)
      field = ','.join(map(str, labels)) if labels else '""'
      lines.append(f'{video} {n} {k} {name} {field}')
  return '\n'.join(lines) + '\n'


def test_charades_reads_pyslowfast_frame_lists(tmp_path):
  train = _write_charades(tmp_path, [
      ('46GP8', [[3], [3, 17], [], [156], [], [], [], []]),
      ('N11GT', [[]] * 6)])
  (tmp_path / 'frame_lists').mkdir()
  (tmp_path / 'frame_lists' / 'train.csv').write_text(train)
  val_root = tmp_path / 'other'
  val_root.mkdir()
  val = _write_charades(val_root, [('0A8CF', [[5, 9]] * 5)])
  (tmp_path / charades.FRAMES_DIR / '0A8CF').symlink_to(
      val_root / charades.FRAMES_DIR / '0A8CF')
  (tmp_path / 'frame_lists' / 'val.csv').write_text(val)
  config = config_lib.get_config('divided', 'tiny,charades')
  config.data.data_dir = str(tmp_path)
  assert (config.model.num_classes, config.model.loss) == (157, 'sigmoid')
  assert datasets.class_names(config)[:2] == ['c000', 'c001']
  source = datasets.get_source(config, 'train')
  assert datasets.is_multi_label(source) and len(source) == 2
  # Video-level labels: the union over every frame of the video.
  expected = np.zeros((2, 157), np.uint8)
  expected[0, [3, 17, 156]] = 1
  np.testing.assert_array_equal(source.labels, expected)
  video, label = source[0]
  np.testing.assert_array_equal(label, expected[0])
  assert isinstance(video.paths, frame_files.NumberedPaths)
  assert (video.num_frames, video.fps, video.frame_size) == (8, 24.0,
                                                             (36, 48))
  frames = video.frames(np.array([7, 0, 7]))
  np.testing.assert_allclose(frames.mean((1, 2, 3)), [56, 0, 56], atol=1)
  assert frames.shape == (3, 36, 48, 3)
  # A reduced JPEG decode, no smaller than asked.
  assert video.frames(np.array([1]), min_size=(18, 24)).shape == (
      1, 18, 24, 3)
  test = datasets.get_source(config, 'test')
  assert [e.path for e in test.entries] == [
      str(tmp_path / charades.FRAMES_DIR / '0A8CF')]
  assert np.flatnonzero(test.labels[0]).tolist() == [5, 9]
  # One batch each way through the input pipeline.
  spec = clip_lib.clip_spec(config)
  batch = next(ip.train_batches(source, spec, 2, seed=0, num_workers=0))
  assert batch['clips'].shape == (2, 4, 32, 32, 3)
  order = ip.epoch_order(0, 0, 2)
  np.testing.assert_array_equal(batch['labels'], expected[order])
  evals, = ip.eval_batches(test, spec, 2, num_workers=0)
  assert evals['clips'].shape == (2, 3, 4, 32, 32, 3)
  np.testing.assert_array_equal(evals['labels'], test.labels[[0, 0]] *
                                np.array([[1], [0]], np.uint8))
  assert evals['mask'].tolist() == [True, False]


def test_charades_class_names_and_errors(tmp_path):
  config = config_lib.get_config('divided', 'tiny,charades')
  config.data.data_dir = str(tmp_path)
  with _raises(FileNotFoundError, 'Dataset charades is missing '
               f'frame_lists/train.csv, {charades.FRAMES_DIR} in '
               f'{str(tmp_path)!r}. It expects {charades.LAYOUT}. '
               f'{charades.HOW_TO}') as e:
    datasets.get_source(config, 'train')
  _one_line_for_the_user(e)
  (tmp_path / 'frame_lists').mkdir()
  (tmp_path / 'frame_lists' / 'train.csv').write_text(
      _write_charades(tmp_path, [('AB12C', [[1], [200]])]))
  with _raises(ValueError, f'{tmp_path}/frame_lists/train.csv:3: labels '
               "'200' are not class indices below 157 separated by "
               'commas.') as e:
    datasets.get_source(config, 'train')
  _one_line_for_the_user(e)
  (tmp_path / 'frame_lists' / 'train.csv').write_text('AB12C 0 0 x.jpg 1\n')
  with _raises(ValueError, f'{tmp_path}/frame_lists/train.csv:1: expected '
               'PySlowFast\'s header "original_vido_id video_id frame_id '
               'path labels".'):
    datasets.get_source(config, 'train')
  names = [f'c{i:03d} Action number {i}' for i in range(157)]
  (tmp_path / charades.CLASSES_FILE).write_text('\n'.join(names) + '\n')
  assert datasets.class_names(config)[156] == 'Action number 156'
  (tmp_path / charades.CLASSES_FILE).write_text('c000 Holding\n')
  with _raises(ValueError, f'{tmp_path}/{charades.CLASSES_FILE} names 1 '
               'classes; Charades has 157, one a line ("c000 Holding some '
               'clothes").'):
    datasets.class_names(config)


def test_numbered_frame_paths_are_stored_compactly():
  paths = [f'/d/v/v-{k:06d}.jpg' for k in range(1, 700)]
  compact = frame_files.numbered(paths)
  assert isinstance(compact, frame_files.NumberedPaths)
  assert list(compact) == paths and compact[-1] == paths[-1]
  assert compact[3:5] == paths[3:5]
  with pytest.raises(IndexError):
    compact[699]  # pylint: disable=pointless-statement
  # A gap, or names without a number, stay as they are.
  assert frame_files.numbered(paths[:3] + paths[4:]) == tuple(
      paths[:3] + paths[4:])
  assert frame_files.numbered(['a.jpg', 'b.jpg']) == ('a.jpg', 'b.jpg')
  # Numbers that outgrow their width.
  assert list(frame_files.numbered(['f9.png', 'f10.png'])) == [
      'f9.png', 'f10.png']
