"""TFDS datasets: the synthetic_motion builder, converted video datasets,
reading them as sources, training on them, and the missing-data error."""

import dataclasses
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import datasets
from tsformer_jax import input_pipeline as ip
from tsformer_jax import train
from tsformer_jax import video_io
from tsformer_jax.datasets import prepare
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import tfds_builders
from tsformer_jax.datasets import tfds_source
from tsformer_jax.datasets import video_writer

from conftest import counting_frames
from conftest import frame_indices
from conftest import predicted_metrics
from conftest import write_csv_split

ROOT = pathlib.Path(__file__).parent.parent
LIMIT = 48  # synthetic_motion videos per split: enough for 6 batches of 8.


def _tfds_config(arg, tfds_dir, **dataset):
  config = config_lib.get_config('divided', arg)
  config.data.update(dict(format='tfds', tfds_dir=str(tfds_dir),
                             **dataset))
  return config


@pytest.fixture(scope='module')
def synthetic_dir(tmp_path_factory):
  """The first LIMIT videos of each synthetic_motion split, as TFDS."""
  root = tmp_path_factory.mktemp('tfds')
  config = _tfds_config('demo', root)
  directory = tfds_builders.prepare(config, limit=LIMIT, num_workers=2)
  assert directory == str(root / 'synthetic_motion' / '2.0.0')
  return root


def test_synthetic_motion_tfds_holds_the_generated_clips(synthetic_dir):
  config = _tfds_config('demo', synthetic_dir)
  info = tfds.builder_from_directory(tfds_builders.builder_dir(config)).info
  assert (info.name, str(info.version)) == ('synthetic_motion', '2.0.0')
  assert info.metadata['class_names'] == list(synthetic_motion.CLASSES)
  # One record per frame: 16 frames a video.
  assert {s: info.splits[s].num_examples for s in info.splits} == {
      'train': 16 * LIMIT, 'test': 16 * LIMIT}
  assert all(f.endswith('.array_record-00000-of-00001')
             for s in info.splits for f in info.splits[s].filenames)
  for split in ('train', 'test'):
    source = datasets.get_source(config, split)
    assert len(source) == LIMIT
    metadata = dict(source.split_metadata)
    videos = metadata.pop('videos')
    assert metadata == dict(skipped=0, errors=[], max_label=1)
    assert videos['first'] == list(range(0, 16 * LIMIT, 16))
    assert videos['id'][7] == f'{split}/00007'
    for index in (0, 7, LIMIT - 1):
      frames, label = synthetic_motion.generate(split, index)
      video, stored_label = source[index]
      assert (stored_label, video.num_frames, video.fps) == (label, 16, 30.0)
      # PNG is lossless: the very same pixels.
      np.testing.assert_array_equal(video.frames(np.arange(16)), frames)
      np.testing.assert_array_equal(video.frames(np.array([9, 2, 9])),
                                    frames[[9, 2, 9]])
  # Frame records, read without our source: video 5's frame 3.
  raw = tfds.builder_from_directory(tfds_builders.builder_dir(config)
                                    ).as_data_source('test')
  assert (raw[5 * 16 + 3]['video'], raw[5 * 16 + 3]['frame']) == (5, 3)
  np.testing.assert_array_equal(raw[5 * 16 + 3]['image'],
                                synthetic_motion.generate('test', 5)[0][3])


def test_preparing_again_keeps_the_data_or_refuses_other_settings(
    synthetic_dir):
  config = _tfds_config('demo', synthetic_dir)
  info = tfds_builders.builder_dir(config) + '/dataset_info.json'
  before = os.stat(info).st_mtime_ns
  assert tfds_builders.prepare(config, limit=LIMIT) == os.path.dirname(info)
  assert os.stat(info).st_mtime_ns == before
  with pytest.raises(ValueError, match=r"prepared with \{'limit': 48\}.*"
                     r"asked for \{'limit': 8\}.*Delete the folder"):
    tfds_builders.prepare(config, limit=8)


class _First:
  """The first `n` videos of a source."""

  def __init__(self, source, n):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return self.source[index]


@pytest.mark.slow
def test_training_runs_on_the_tfds_source(synthetic_dir, tmp_path):
  config = _tfds_config('demo', synthetic_dir)
  config.model.update(depth=1, num_frames=4)
  config.num_train_steps = 2
  config.batch_size = config.eval_batch_size = 8
  config.data.num_workers = 2
  # Batches equal those read from the generated clips themselves.
  spec = clip_lib.clip_spec(config)
  batches = [next(ip.train_batches(source, spec, 8, seed=3, start_step=5,
                                   num_workers=2))
             for source in (datasets.get_source(config, 'train'),
                            _First(synthetic_motion.Source('train'), LIMIT))]
  np.testing.assert_array_equal(batches[0]['labels'], batches[1]['labels'])
  np.testing.assert_array_equal(batches[0]['clips'], batches[1]['clips'])
  results = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert results['step'] == 2 and results['skipped_videos'] == 0
  assert results == pytest.approx(
      results | predicted_metrics(tmp_path / 'work'), abs=1e-6)
  assert np.isfinite(results['train_loss'])


def test_missing_tfds_data_names_the_folder_and_the_command(tmp_path):
  config = _tfds_config('tiny,k400', tmp_path / 'none',
                        data_dir='/data/k 400')
  expected = str(tmp_path / 'none' / 'encoded_videos' / 'kinetics400' /
                 '2.0.0')
  command = ("python -m tsformer_jax.datasets.prepare "
             "--config=configs/divided.py:tiny,kinetics400 "
             f"--out={tmp_path / 'none'} "
             "'--config.data.data_dir=/data/k 400'")
  with pytest.raises(FileNotFoundError) as error:
    datasets.get_source(config, 'train')
  message = str(error.value)
  assert f"{expected!r} holds no prepared kinetics400" in message
  assert message.endswith(command)
  config.data.format = 'tfrecord'
  with pytest.raises(ValueError, match=r"'tfrecord'.*\['files', 'tfds'\]"):
    datasets.get_source(config, 'train')


@pytest.mark.parametrize('flag, message', [
    ('--fps=-1', '-1.0 is not a non-negative number'),  # 0 keeps all.
    ('--short_side=-1', '-1 is not a non-negative integer'),  # 0 keeps all.
    ('--num_workers=0', '0 is not a positive integer'),
    ('--limit=0', '0 is not a positive integer'),  # None: no limit.
    ('--jpeg_quality=96', '96 is not an integer in the range [1, 95]'),
    ('--mode=eval', '--mode is not a flag of prepare (it takes: --config, '
     '--out, and those prepare --help lists).'),
])
def test_prepare_refuses_a_bad_flag_in_one_line(tmp_path, capsys, flag,
                                                message):
  status = cli.call(prepare.main, [
      'prepare', f'--config={ROOT}/configs/divided.py:demo',
      f'--out={tmp_path}', flag])
  lines = capsys.readouterr().err.strip().splitlines()
  assert status == 2
  assert len(lines) == 1 and lines[0].startswith('prepare: error: ')
  assert lines[0].endswith(message), lines
  assert not list(tmp_path.iterdir())


def test_subsample_keeps_at_most_the_target_rate():
  indices, fps = tfds_builders.subsample(30, 30.0, 15.0)
  assert (indices.tolist(), fps) == (list(range(0, 30, 2)), 15.0)
  indices, fps = tfds_builders.subsample(10, 25.0, 10.0)  # 0, 2.5, 5, 7.5
  assert (indices.tolist(), fps) == ([0, 2, 5, 7], 10.0)
  for target in (0.0, 30.0, 60.0):  # Keep all: no target, or slower.
    indices, fps = tfds_builders.subsample(7, 30.0, target)
    assert (indices.tolist(), fps) == (list(range(7)), 30.0)




def test_streamed_frames_equal_decoded_frames(tmp_path):
  path = str(tmp_path / 'count.mp4')
  video_writer.write_mp4(path, counting_frames(20))
  whole = tmp_path / 'whole.webm'
  video_writer.write_webm(str(whole), counting_frames(30))
  cut = tmp_path / 'cut.webm'  # Its header still says 30 frames.
  cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
  for video, indices in [
      (video_io.VideoFile(path), [0, 0, 3, 19]),
      (video_io.VideoFile(path, 4, 12), [0, 3, 7, 7, 9]),  # A window.
      (video_io.VideoFile(str(cut)), list(range(30)))]:
    streamed = np.stack(list(tfds_builders.iter_frames(video, indices)))
    np.testing.assert_array_equal(streamed, video.frames(np.array(indices)))
  assert frame_indices(streamed)[-1] < 29  # The cut repeats its last frame.
  bad = tmp_path / 'bad.mp4'
  bad.write_bytes(b'not a video')
  with pytest.raises(clip_lib.BadVideoError, match='bad.mp4'):
    list(tfds_builders.iter_frames(video_io.VideoFile(str(bad)), [0]))


def _write_csv_split(root, split, good, bad_at):
  # Labels up to 3, so that the stored max_label is put to the test.
  return write_csv_split(root, split, good, bad_at, fps=25,
                         relabel=lambda label, index: label + 2 * (index % 2))


def _jpeg(frame, quality):
  """An independent JPEG round trip with PIL."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(frame).save(buffer, format='JPEG', quality=quality)
  return np.asarray(PIL.Image.open(buffer).convert('RGB'))


@pytest.mark.slow
def test_a_csv_dataset_converts_with_the_cli(tmp_path):
  data, out = tmp_path / 'data', tmp_path / 'tfds'
  entries = {'train': _write_csv_split(data, 'train', 5, bad_at=(1, 4)),
             'test': _write_csv_split(data, 'test', 3, bad_at=())}
  subprocess.run(
      [sys.executable, '-m', 'tsformer_jax.datasets.prepare',
       f'--config={ROOT}/configs/divided.py:tiny,k400',
       f'--config.data.data_dir={data}', f'--out={out}',
       '--num_workers=2'],
      check=True, cwd=ROOT, capture_output=True, timeout=120)
  config = _tfds_config('tiny,k400', out, data_dir=str(data))
  directory = tfds_builders.builder_dir(config)
  assert directory == str(out / 'encoded_videos' / 'kinetics400' / '2.0.0')
  metadata = json.loads(pathlib.Path(directory, 'metadata.json').read_text())
  assert (metadata['short_side'], metadata['fps'],
          metadata['jpeg_quality']) == (320, 15.0, 75)
  train_meta = metadata['splits']['train']
  assert train_meta['skipped'] == 2 and train_meta['max_label'] == 3
  assert ['bad1.mp4' in e for e in train_meta['errors']] == [True, False]
  assert 'bad4.mp4' in train_meta['errors'][1]
  assert metadata['splits']['test']['skipped'] == 0
  raw = tfds.builder_from_directory(directory).as_data_source('train')
  for split in ('train', 'test'):
    source = datasets.get_source(config, split)
    good = [e for e in entries[split] if 'bad' not in e.path]
    assert len(source) == len(good)
    assert source.split_metadata['skipped'] == (2 if split == 'train' else 0)
    for index, entry in enumerate(good):
      video, label = source[index]
      file = video_io.VideoFile(entry.path)
      # 25 fps at most 15: frames 0, 1.67, 3.33, ... of the 16.
      kept, _ = tfds_builders.subsample(16, 25.0, 15.0)
      assert (label, video.num_frames, video.fps) == (entry.label, 10, 15.0)
      stored = video.frames(np.arange(10))
      decoded = file.frames(kept)
      # Exactly the decoded frames through JPEG at quality 75 ...
      np.testing.assert_array_equal(
          stored, np.stack([_jpeg(f, 75) for f in decoded]))
      # ... whose error on these noisy 32 px frames is 7.8 on average.
      assert np.abs(stored.astype(float) - decoded).mean() < 9
      if split == 'train':
        assert source.split_metadata['videos']['path'][index] == entry.path
        record = raw[video.first + 2]
        assert (record['video'], record['frame']) == (index, 2)
  with pytest.raises(FileNotFoundError, match=(
      r"(?s)holds splits \['test', 'train'\], not 'val'. Delete .*"
      r'--splits=test,train,val$')):
    datasets.get_source(config, 'val')


def test_conversion_shrinks_and_subsamples(tmp_path):
  data = tmp_path / 'data'
  (data / 'v').mkdir(parents=True)
  video_writer.write_mp4(str(data / 'v' / 'a.mp4'),
                        counting_frames(30, 48, 64), fps=30)
  (data / 'train.csv').write_text('v/a.mp4 1\n')
  config = _tfds_config('tiny,k400', tmp_path / 'tfds', data_dir=str(data),
                        eval_split='train')
  tfds_builders.prepare(config, short_side=24, fps=15.0, num_workers=1)
  video, label = datasets.get_source(config, 'train')[0]
  assert (label, video.num_frames, video.fps) == (1, 15, 15.0)
  frames = video.frames(np.arange(15))
  assert frames.shape == (15, 24, 32, 3)
  assert frame_indices(frames) == list(range(0, 30, 2))


def test_data_in_the_old_layout_is_refused_with_the_command(tmp_path):
  config = _tfds_config('tiny,k400', tmp_path, data_dir='/data/k400')
  old = tmp_path / 'encoded_videos' / 'kinetics400' / '1.0.0'
  old.mkdir(parents=True)
  (old / 'dataset_info.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=(
      r"(?s)kinetics400/1.0.0' holds kinetics400 prepared in the old layout "
      r'1.0.0 \(one record per video\); this version reads layout 2.0.0.*'
      r'Prepare it again with:\n  python -m tsformer_jax.datasets.prepare '
      r'.*--config.data.data_dir=/data/k400$')):
    datasets.get_source(config, 'train')


class _CountingRecords:
  """Records that note the keys read."""

  def __init__(self, records):
    self.records, self.keys = records, []

  def __getitems__(self, keys):
    self.keys.extend(keys)
    return self.records.__getitems__(keys)


def test_a_clip_reads_only_the_frames_it_uses(synthetic_dir):
  config = _tfds_config('demo', synthetic_dir)
  source = datasets.get_source(config, 'train')
  spec = clip_lib.clip_spec(config)
  video, _ = source[9]
  records = _CountingRecords(video.records)
  counted = dataclasses.replace(video, records=records)
  clip = clip_lib.train_clip(counted, spec, np.random.default_rng(0))
  indices = clip_lib.temporal_indices(16, 30.0, spec,
                                      rng=np.random.default_rng(0))
  assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.float32
  assert records.keys == [video.first + i for i in dict.fromkeys(
      indices.tolist())]
  assert video.first == 9 * 16


def test_tfds_sources_pickle_as_their_folder(synthetic_dir):
  config = _tfds_config('demo', synthetic_dir)
  source = datasets.get_source(config, 'test')
  copy = pickle.loads(pickle.dumps(source))
  assert len(pickle.dumps(source)) < 1000  # The folder, not the data.
  np.testing.assert_array_equal(copy[3][0].frames(np.arange(16)),
                                source[3][0].frames(np.arange(16)))
  assert copy[3][1] == source[3][1]


def test_jpeg_frames_decode_at_a_reduced_scale_where_the_crop_allows():
  """PIL's draft decodes a JPEG at 1/2, 1/4 or 1/8 of its size in the DCT;
  a clip resized by PIL's antialiased filter asks for the smallest no
  smaller than its resized frame. On smooth frames the clips stay within a
  few levels of full decoding."""
  y, x = np.mgrid[0:256, 0:320]
  frame = np.stack([128 + 100 * np.sin(x / 17.0),
                    128 + 100 * np.cos(y / 23.0), 90 + 0 * x], -1
                   ).astype(np.uint8)
  data = tfds_builders.encode_jpeg(frame, 90)
  assert tfds_builders.decode_image(data).shape == (256, 320, 3)
  assert tfds_builders.decode_image(data, (64, 80)).shape == (64, 80, 3)
  assert tfds_builders.decode_image(data, (65, 80)).shape == (128, 160, 3)
  records = [dict(image=data)] * 4
  video = tfds_source.EncodedVideo(_Records(records), 0, 4, 30.0,
                                   (256, 320))
  full = clip_lib.ArrayVideo(np.stack([tfds_builders.decode_image(data)] * 4))
  spec = clip_lib.ClipSpec(num_frames=4, sampling_rate=1, crop_size=(48, 48),
                           train_scales=(64, 64), num_clips=1, num_crops=3,
                           resize='antialias')
  for seed in range(4):
    reduced = clip_lib.train_clip(video, spec, np.random.default_rng(seed))
    whole = clip_lib.train_clip(full, spec, np.random.default_rng(seed))
    difference = np.abs(reduced.astype(int) - whole)
    assert reduced.shape == (4, 48, 48, 3)
    assert difference.mean() < 1 and difference.max() <= 4  # 0.52, 3.
  difference = np.abs(clip_lib.eval_clips(video, spec).astype(int) -
                      clip_lib.eval_clips(full, spec))
  assert difference.mean() < 1 and difference.max() <= 4  # 0.39, 2.


class _Records:
  """A list of records with `__getitems__`, as TFDS's data sources."""

  def __init__(self, records):
    self.records = records

  def __getitems__(self, keys):
    return [self.records[k] for k in keys]
