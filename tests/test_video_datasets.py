"""Video files and the video datasets: decoding, layouts, errors, training.

Every video here is generated (synthetic_motion, or frames whose brightness
encodes their index) and written with PyAV: mp4 (H.264) and webm (VP9).
"""

import fractions
import json
import os
import re

import av
import numpy as np
import pytest

from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import datasets
from tsformer_jax import train
from tsformer_jax import video_io
from tsformer_jax.datasets import kinetics
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_files
from tsformer_jax.datasets import video_writer

from conftest import counting_frames
from conftest import frame_indices
from conftest import predicted_metrics
from conftest import write_csv_split

WRITERS = {'mp4': video_writer.write_mp4, 'webm': video_writer.write_webm}


def _pool(frames, size=4):
  """Means over size x size blocks: float `[F, H/size, W/size, 3]`."""
  f, h, w, c = frames.shape
  return frames.reshape(f, h // size, size, w // size, size, c).astype(
      float).mean((2, 4))


def _config(name, data_dir, variant='tiny'):
  config = config_lib.get_config('divided', f'{variant},{name}')
  config.data.data_dir = str(data_dir)
  return config


@pytest.mark.parametrize('ext', sorted(WRITERS))
def test_round_trip_keeps_frames_rate_and_content(tmp_path, ext):
  frames, _ = synthetic_motion.generate('train', 3)  # [16, 32, 32, 3]
  path = str(tmp_path / f'clip.{ext}')
  WRITERS[ext](path, frames, fps=25)
  video = video_io.VideoFile(path)
  assert (video.num_frames, video.fps) == (16, 25.0)
  decoded = video.frames(np.arange(16))
  assert decoded.shape == frames.shape and decoded.dtype == np.uint8
  # yuv420p halves the colour resolution and the noise is per pixel:
  # compare 4 x 4 block means, and where the square is.
  assert np.abs(_pool(decoded) - _pool(frames)).mean() < 4
  for a, b in zip(frames, decoded, strict=True):
    centre = [np.argwhere(f.mean(-1) > 90).mean(0) for f in (a, b)]
    np.testing.assert_allclose(centre[0], centre[1], atol=1)


@pytest.mark.parametrize('ext', sorted(WRITERS))
def test_frames_are_the_requested_indices(tmp_path, ext):
  path = str(tmp_path / f'count.{ext}')
  WRITERS[ext](path, counting_frames(30))
  video = video_io.VideoFile(path)
  assert video.num_frames == 30
  for indices in ([0, 3, 3, 7, 29], [12, 2, 2, 0], [5]):
    assert frame_indices(video.frames(np.array(indices))) == indices
  assert video.frames(np.array([], int)).shape == (0, 32, 32, 3)


def test_an_over_estimated_length_repeats_the_last_decoded_frame(tmp_path):
  """A webm cut in half: its header still says 30 frames."""
  whole = tmp_path / 'whole.webm'
  video_writer.write_webm(str(whole), counting_frames(30))
  cut = tmp_path / 'cut.webm'
  cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
  video = video_io.VideoFile(str(cut))
  assert video.num_frames == 30
  shown = frame_indices(video.frames(np.arange(30)))
  last = shown[-1]
  assert 0 < last < 29
  assert shown == [min(i, last) for i in range(30)]


def test_odd_sizes_are_padded_to_even(tmp_path):
  path = str(tmp_path / 'odd.mp4')
  video_writer.write_mp4(path, counting_frames(4, 15, 17))
  assert video_io.VideoFile(path).frames([1]).shape == (1, 16, 18, 3)


def test_unreadable_files_are_bad_videos(tmp_path):
  (tmp_path / 'empty.mp4').write_bytes(b'')
  (tmp_path / 'noise.mp4').write_bytes(
      np.random.default_rng(0).bytes(4096))
  (tmp_path / 'text.webm').write_text('not a video')
  for name in ('empty.mp4', 'noise.mp4', 'text.webm', 'absent.mp4'):
    video = video_io.VideoFile(str(tmp_path / name))
    with pytest.raises(clip_lib.BadVideoError, match=name):
      _ = video.num_frames
    with pytest.raises(clip_lib.BadVideoError, match=name):
      video.frames(np.array([0]))
  # An mp4 cut after its index: 16 frames announced, none to decode.
  whole = tmp_path / 'whole.mp4'
  video_writer.write_mp4(str(whole), counting_frames(16))
  data = whole.read_bytes()
  (tmp_path / 'no_frames.mp4').write_bytes(data[:data.index(b'mdat') + 4])
  video = video_io.VideoFile(str(tmp_path / 'no_frames.mp4'))
  assert video.num_frames == 16
  with pytest.raises(clip_lib.BadVideoError, match='no decodable frame'):
    video.frames(np.array([0]))


def _get_seq_frames(video_length, num_frames, train, rng=None):
  """PySlowFast's SSv2 `get_seq_frames`, as the original writes it."""
  seg_size = float(video_length - 1) / num_frames
  seq = []
  for i in range(num_frames):
    start = int(np.round(seg_size * i))
    end = int(np.round(seg_size * (i + 1)))
    if train:
      seq.append(rng.randint(start, end))  # random.randint: inclusive.
    else:
      seq.append((start + end) // 2)
  return seq


@pytest.mark.parametrize('length', [1, 2, 5, 8, 9, 17, 80, 81, 173, 300])
@pytest.mark.parametrize('frames', [8, 16])
def test_segment_sampling_is_the_originals(length, frames):
  spec = clip_lib.ClipSpec(num_frames=frames, sampling_rate=99,
                           crop_size=(8, 8), sampling='segments', num_clips=1)
  np.testing.assert_array_equal(clip_lib.temporal_indices(length, 12.0, spec,
                                                          clip=0),
                                _get_seq_frames(length, frames, False))
  # Training: each frame uniform over its segment, both ends included.
  seg = (length - 1) / frames
  starts = np.round(seg * np.arange(frames)).astype(int)
  ends = np.round(seg * np.arange(1, frames + 1)).astype(int)
  rng = np.random.default_rng(0)
  draws = np.stack([clip_lib.temporal_indices(length, 30.0, spec, rng=rng)
                    for _ in range(300)])
  assert ((draws >= starts) & (draws <= ends)).all()
  for column, lo, hi in zip(draws.T, starts, ends, strict=True):
    assert set(column) == set(range(lo, hi + 1))


def test_segment_sampling_test_clips():
  """Several test clips take the point (2k + 1) / 2n of each segment; one
  clip is the original's middle."""
  two = clip_lib.ClipSpec(8, 1, (8, 8), sampling='segments', num_clips=2)
  # 81 frames: segments of 10 frames, [0, 10], [10, 20], ...
  np.testing.assert_array_equal(
      clip_lib.temporal_indices(81, 30.0, two, clip=0), np.arange(2, 80, 10))
  np.testing.assert_array_equal(
      clip_lib.temporal_indices(81, 30.0, two, clip=1), np.arange(7, 80, 10))
  with pytest.raises(ValueError, match="'rate', 'segments'"):
    clip_lib.temporal_indices(
        80, 30.0, clip_lib.ClipSpec(8, 1, (8, 8), sampling='x'), clip=0)


def test_configs_select_the_dataset():
  hr = config_lib.get_config('divided', 'hr,ssv2')
  assert (hr.data.dataset, hr.model.num_classes, hr.model.num_frames,
          tuple(hr.model.image_size), hr.data.flip, hr.data.sampling) == (
              'ssv2', 174, 16, (448, 448), False, 'segments')
  assert clip_lib.clip_spec(hr).sampling == 'segments'
  assert config_lib.get_config('divided', 'ssv2').model.num_frames == 8
  assert config_lib.get_config('divided', 'L,ssv2').model.num_frames == 64
  k600 = config_lib.get_config('divided', 'k600')
  assert (k600.variant, k600.data.dataset, k600.model.num_classes,
          k600.data.flip, k600.data.sampling) == ('base', 'kinetics600', 600,
                                                  True, 'rate')
  d48 = config_lib.get_config('joint', 'diving48,hr')
  assert (d48.model.num_classes, d48.model.num_frames, d48.data.flip) == (
      48, 16, True)
  demo = config_lib.get_config('divided', 'demo')
  assert (demo.data.dataset, demo.model.num_classes) == ('synthetic_motion',
                                                          2)
  assert config_lib.get_config('divided').data.sampling == 'rate'
  with pytest.raises(ValueError,
                     match=r"'ssv3'.*dataset: \['charades', 'diving48', "):
    config_lib.get_config('divided', 'hr,ssv3')
  with pytest.raises(ValueError, match="'dataset' given twice"):
    config_lib.get_config('divided', 'k400,ssv2')


@pytest.mark.slow
def test_a_csv_dataset_trains_and_evaluates_skipping_bad_files(tmp_path):
  data = tmp_path / 'data'
  (data / 'train').mkdir(parents=True)
  (data / 'test').mkdir()
  # Bad videos at the same indices in both splits count once each.
  write_csv_split(data, 'train', 6, bad_at=(2, 5))
  write_csv_split(data, 'test', 4, bad_at=(2, 5))
  config = config_lib.get_config('divided', 'demo')
  config.data.dataset = 'kinetics400'
  config.data.data_dir = str(data)
  config.model.num_classes = 4
  config.model.depth = 1
  config.num_train_steps = 2  # One epoch of 8: every video is read.
  config.batch_size = config.eval_batch_size = 4
  config.data.test_num_crops = 1
  results = train.train_and_evaluate(config, str(tmp_path / 'work'))
  written = json.loads((tmp_path / 'work' / 'results.json').read_text())
  assert written == results
  assert results['step'] == 2 and results['skipped_videos'] == 4
  assert results == pytest.approx(
      results | predicted_metrics(tmp_path / 'work'), abs=1e-6)


def test_csv_lines_paths_and_labels_are_checked(tmp_path):
  (tmp_path / 'a b').mkdir()
  video_writer.write_mp4(str(tmp_path / 'a b' / 'v.mp4'), counting_frames(4))
  (tmp_path / 'train.csv').write_text(
      f'a b/v.mp4 3\n\n{tmp_path}/a b/v.mp4 1\n')
  source = datasets.get_source(_config('k400', tmp_path), 'train')
  assert [os.path.basename(e.path) for e in source.entries] == ['v.mp4'] * 2
  assert source.labels.tolist() == [3, 1]
  assert source[1][0].num_frames == 4
  config = _config('k400', tmp_path)
  config.model.num_classes = 3
  with pytest.raises(ValueError, match='class 3.*num_classes is 3'):
    datasets.get_source(config, 'train')
  (tmp_path / 'val.csv').write_text('a b/v.mp4 3\nno_label.mp4\n')
  with pytest.raises(ValueError, match=r'val.csv:2: expected "path label"'):
    datasets.get_source(_config('k400', tmp_path), 'val')
  (tmp_path / 'test.csv').write_text('elsewhere/v.mp4 0\n')
  with pytest.raises(FileNotFoundError, match='None of the first 1 videos'):
    datasets.get_source(_config('k400', tmp_path), 'test')


def test_a_dataset_overridden_without_its_recipe_is_refused(tmp_path):
  """`--config.data.dataset=ssv2` on a Kinetics config keeps 400 classes
  (and flips, rate sampling): refused, naming the config arg."""
  config = _config('kinetics400', tmp_path)
  config.model.num_classes = 400
  config.data.dataset = 'ssv2'
  with pytest.raises(ValueError, match=re.escape(
      'config.data.dataset ssv2 has 174 classes, but config.model.'
      'num_classes is 400. Select the dataset with the config arg, which '
      'sets its recipe too (e.g. --config=configs/divided.py:base,ssv2), or'
      ' set --config.model.num_classes=174.')):
    datasets.get_source(config, 'train')
  config.data.dataset = 'kinetics400'  # Beyond its classes: refused too.
  config.model.num_classes = 401
  with pytest.raises(ValueError, match='kinetics400 has 400 classes'):
    datasets.get_source(config, 'train')
  # A Kinetics subset (Mini-Kinetics' 200 classes) goes on to the files.
  config.model.num_classes = 200
  with pytest.raises(FileNotFoundError, match='train.csv'):
    datasets.get_source(config, 'train')


def test_missing_datasets_name_the_files_expected(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"train.csv in '.*'.*path label.*video path"):
    datasets.get_source(_config('kinetics400', tmp_path), 'train')
  with pytest.raises(FileNotFoundError, match=(
      r'something-something-v2-validation.json, '
      r'something-something-v2-labels.json, 20bn-something-something-v2 or '
      r'videos in')):
    datasets.get_source(_config('ssv2', tmp_path), 'test')
  with pytest.raises(FileNotFoundError,
                     match=r'Diving48_V2_train.json, rgb in .*/\{vid_name\}'):
    datasets.get_source(_config('diving48', tmp_path), 'train')
  with pytest.raises(FileNotFoundError,
                     match=r'data_dir is empty.*\{train,val,test\}\.csv'):
    datasets.get_source(_config('k600', ''), 'test')
  config = _config('k400', tmp_path)
  with pytest.raises(ValueError, match=r"split 'dev'.*\['test', 'train'"):
    datasets.get_source(config, 'dev')
  config.data.dataset = 'ucf101'
  with pytest.raises(ValueError, match=r"'ucf101'.*'kinetics600', 'ssv2'"):
    datasets.get_source(config, 'train')


SSV2_TEMPLATES = ['Holding something next to something',
                  'Pushing something from left to right',
                  'Putting something on a surface']


@pytest.mark.parametrize('video_dir', ['20bn-something-something-v2',
                                       'videos'])
def test_ssv2_layout_loads_with_its_labels(tmp_path, video_dir):
  shipped = datasets.class_names(_config('ssv2', ''))
  assert len(shipped) == 174
  # The labels file decides the indices: here the reverse of the shipped
  # (alphabetical) order.
  labels = {name: str(173 - i) for i, name in enumerate(shipped)}
  (tmp_path / 'something-something-v2-labels.json').write_text(
      json.dumps(labels))
  items = [dict(id=str(100 + i), label='whatever',
                template=t.replace('something', '[something]'),
                placeholders=['a', 'b'])
           for i, t in enumerate(SSV2_TEMPLATES)]
  (tmp_path / 'something-something-v2-train.json').write_text(
      json.dumps(items))
  (tmp_path / 'something-something-v2-validation.json').write_text(
      json.dumps(items[1:]))
  for item in items:
    video_writer.write_webm(str(tmp_path / video_dir / f'{item["id"]}.webm'),
                           counting_frames(24), fps=12)
  config = _config('ssv2', tmp_path)
  train_source = datasets.get_source(config, 'train')
  names = datasets.class_names(config)
  assert names == shipped[::-1]
  assert [names[y] for y in train_source.labels] == SSV2_TEMPLATES
  assert len(datasets.get_source(config, 'test')) == 2  # Validation list.
  video, label = train_source[2]
  assert label == 173 - shipped.index(SSV2_TEMPLATES[2])
  assert (video.num_frames, video.fps) == (24, 12.0)
  # Segments as the original's, over its 30 fps JPEGs: 60 of them, bounds
  # round(14.75 * i) = 0, 15, 30, 44, 59; the middles (start + end) // 2 =
  # 7, 22, 37, 51 show the frames nearest 7 / 30 s, ...: 3, 9, 15, 20.
  spec = clip_lib.clip_spec(config)
  assert spec.sampling == 'segments' and not spec.flip
  indices = clip_lib.temporal_indices(video.num_frames, video.fps, spec, clip=0)
  assert frame_indices(video.frames(indices)) == [3, 9, 15, 20]
  assert clip_lib.eval_views(video, spec).shape == (3, 4, 32, 32, 3)
  items[0]['template'] = 'Juggling [something]'
  (tmp_path / 'something-something-v2-train.json').write_text(
      json.dumps(items))
  with pytest.raises(ValueError, match="'Juggling \\[something\\]'"):
    datasets.get_source(config, 'train')


def test_diving48_layout_loads_its_frame_windows(tmp_path):
  for name in ('a', 'b'):
    video_writer.write_mp4(str(tmp_path / 'rgb' / f'{name}.mp4'),
                          counting_frames(16))
  (tmp_path / 'Diving48_V2_train.json').write_text(json.dumps([
      dict(vid_name='a', label=47, start_frame=0, end_frame=16),
      dict(vid_name='b', label=5, start_frame=4, end_frame=12)]))
  (tmp_path / 'Diving48_V2_test.json').write_text(json.dumps([
      dict(vid_name='b', label=2, start_frame=0, end_frame=16)]))
  config = _config('diving48', tmp_path)
  source = datasets.get_source(config, 'train')
  assert source.labels.tolist() == [47, 5]
  whole, cut = source[0][0], source[1][0]
  assert (whole.num_frames, cut.num_frames) == (16, 8)
  assert frame_indices(cut.frames(np.array([0, 7, 9]))) == [4, 11, 11]
  assert datasets.get_source(config, 'val').labels.tolist() == [2]
  names = datasets.class_names(config)
  assert len(names) == 48 and names[0] == 'Back+15som+05Twis+FREE'


def test_kinetics_class_names(tmp_path):
  k400 = datasets.class_names(_config('kinetics400', ''))
  assert len(k400) == 400 and k400[:2] == ['abseiling', 'air drumming']
  assert datasets.class_names(_config('k600', ''))[:3] == ['0', '1', '2']
  # Videos in one folder per class name the classes.
  lines = [f'train/class_{i}/v{j}.mp4 {i}\n' for i in range(600)
           for j in range(2)]
  (tmp_path / 'train.csv').write_text(''.join(lines))
  names = datasets.class_names(_config('k600', tmp_path))
  assert names[:2] == ['class 0', 'class 1'] and len(names) == 600
  (tmp_path / 'train.csv').write_text(''.join(lines[:-2]))  # Class missing.
  assert datasets.class_names(_config('k600', tmp_path))[599] == '599'


def test_synthetic_motion_videos_are_written_then_decoded(tmp_path,
                                                          monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  config = config_lib.get_config('divided', 'demo,synthetic_motion_videos')
  assert (config.data.dataset, config.model.num_classes,
          config.data.flip) == ('synthetic_motion_videos', 2, True)
  assert datasets.data_dir(config) == str(
      tmp_path / 'cache' / 'tsformer_jax' / 'synthetic_motion_videos')
  config.data.data_dir = str(tmp_path / 'videos')
  kinetics.prepare_synthetic_motion(config.data.data_dir, 'test', count=6)
  source = datasets.get_source(config, 'test')  # Reads, writes nothing.
  assert len(source) == 6
  assert datasets.class_names(config) == list(synthetic_motion.CLASSES)
  for index in (0, 5):
    frames, label = synthetic_motion.generate('test', index)
    video, source_label = source[index]
    assert source_label == label and video.num_frames == 16
    decoded = video.frames(np.arange(16))
    assert np.abs(_pool(decoded) - _pool(frames)).mean() < 4
  # The in-memory demo stays as it was.
  memory = datasets.get_source(config_lib.get_config('divided', 'demo'),
                               'test')
  assert len(memory) == 256 and memory[5][1] == source[5][1]


def _write_gop_video(path, frames, container='mp4', fps=30):
  """H.264 with B-frames and a keyframe every 12 frames (or VP9 in webm,
  every 12 frames): files where seeking and frame skipping matter."""
  codec, options = (('libx264', {'g': '12', 'bf': '3', 'crf': '18',
                                 'preset': 'veryfast'}) if container == 'mp4'
                    else ('libvpx-vp9', {'g': '12', 'deadline': 'realtime',
                                         'cpu-used': '8', 'crf': '20',
                                         'b': '0'}))
  with av.open(str(path), 'w', format=container) as out:
    stream = out.add_stream(codec, rate=fractions.Fraction(fps))
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = 'yuv420p'
    stream.options = options
    for frame in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(frame,
                                                       format='rgb24')))
    out.mux(stream.encode())


def _numbered_frames(n, size=32):
  """Frames whose red and green levels tell their index (up to 1023): uint8
  `[n, size, size, 3]`."""
  index = np.arange(n)
  levels = np.stack([8 * (index % 32), 8 * (index // 32), 0 * index], -1)
  return np.broadcast_to(levels[:, None, None].astype(np.uint8),
                         (n, size, size, 3)).copy()


def _numbers(frames):
  levels = np.round(frames.mean((1, 2)) / 8).astype(int)
  return (levels[:, 0] + 32 * levels[:, 1]).tolist()


def _every_frame(path):
  """Every frame in decoding order, decoded plainly: the reference."""
  with av.open(str(path)) as container:
    return np.stack([f.to_ndarray(format='rgb24')
                     for f in container.decode(video=0)])


@pytest.mark.parametrize('container', ['mp4', 'webm'])
def test_seeking_and_skipping_decode_the_frames_asked_for(tmp_path,
                                                          container):
  """Seeking to the keyframe before a clip and skipping the non-reference
  frames it does not use give exactly the frames of a plain decode from
  frame 0, in any order, repeated, and past the end."""
  path = tmp_path / f'gop.{container}'
  _write_gop_video(path, _numbered_frames(150), container)
  every = _every_frame(path)
  assert _numbers(every) == list(range(150))
  rng = np.random.default_rng(0)
  cases = [[0], [149], [149, 0, 75, 75], list(range(150)), [140, 150, 999],
           [37, 38, 39], [100, 101, 130]]
  cases += [np.linspace(s, s + 63, 8).astype(int).tolist()
            for s in rng.integers(0, 86, 6)]
  for indices in cases:
    got = video_io.decode(str(path), indices)
    want = every[np.minimum(indices, 149)]
    np.testing.assert_array_equal(got, want, err_msg=str(indices))


def test_a_clip_opens_its_file_once(tmp_path, monkeypatch):
  path = tmp_path / 'gop.mp4'
  _write_gop_video(path, counting_frames(90))
  opened = []
  real_open = av.open
  monkeypatch.setattr(av, 'open', lambda *a, **k: opened.append(a[0]) or
                      real_open(*a, **k))
  spec = clip_lib.ClipSpec(num_frames=4, sampling_rate=8, crop_size=(16, 16),
                           train_scales=(16, 24), num_clips=2)
  source = video_files.FileSource([video_files.Entry(str(path), 0)])
  video, _ = source[0]
  clip = clip_lib.train_clip(video, spec, np.random.default_rng(0))
  assert clip.shape == (4, 16, 16, 3) and opened == [str(path)]
  # Evaluation decodes once for all its clips.
  opened.clear()
  views = clip_lib.eval_clips(source[0][0], spec)
  assert views.shape == (6, 4, 16, 16, 3) and opened == [str(path)]
