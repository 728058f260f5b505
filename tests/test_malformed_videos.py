"""Malformed and unusual videos (issue 20, parts 3 and 4).

Each file of the corpus (`malformed_videos`) either decodes as a player
shows it (odd sizes, 10-bit, 4:4:4, a variable frame rate, a rotation,
videos shorter than a clip) or is counted and skipped with its reason, in
training, evaluation and `predict` (one error line, exit status 1). A
decoder that stalls counts its video bad once the time bound
(`config.data.decode_timeout_s`) passes, and the rest goes on.
"""

import json
import logging
import os
import pathlib
import re
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil
import pytest

from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import input_pipeline as ip
from tsformer_jax import long_video
from tsformer_jax import predict
from tsformer_jax import train
from tsformer_jax import video_io
from tsformer_jax.datasets import kinetics
from tsformer_jax.datasets import video_files

from conftest import predicted_metrics
from conftest import read_both_loaders
import malformed_videos as mv

SPEC = clip_lib.ClipSpec(num_frames=4, sampling_rate=2, crop_size=(16, 16),
                         train_scales=(16, 20), num_crops=1,
                         decode_timeout_s=30.0)
BAD = ['audio_only', 'cut_in_half', 'directory', 'empty', 'noise',
       'unreadable']
GOOD = ['odd_444', 'odd_vp9', 'one_frame', 'rotated', 'short', 'ten_bit',
        'ten_bit_444', 'tiny', 'unicode', 'vfr']


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  cases = mv.build(str(tmp_path_factory.mktemp('corpus')))
  assert mv.bad(cases) == BAD and mv.good(cases) == GOOD
  return cases


def _expected_frames(case, video):
  """What frames 0..num_frames-1 must be: uint8 `[F, H, W, 3]`."""
  if case.name != 'vfr.mp4':
    return case.shown
  return case.shown[mv.shown_at(mv.VFR_TIMES_MS, video.fps,
                                video.num_frames)]


def _reason(case) -> str:
  """The whole message a skipped case raises, as a pattern."""
  return f'{re.escape(case.path)}: {case.reason}'


@pytest.mark.parametrize('key', GOOD)
def test_these_decode_as_a_player_shows_them(corpus, key):
  case = corpus[key]
  video = video_io.VideoFile(case.path)
  assert video.num_frames == len(case.shown)
  assert video.frame_size == case.shown.shape[1:3]
  expected = _expected_frames(case, video)
  decoded = video.frames(np.arange(video.num_frames))
  assert decoded.shape == expected.shape and decoded.dtype == np.uint8
  assert np.abs(decoded.astype(float) - expected).mean() <= case.tolerance
  # Past the end, as in a clip longer than the video: the last frame.
  past = video.frames(np.array([video.num_frames + 5, 10 * video.num_frames]))
  for frame in past:
    assert np.abs(frame.astype(float) - case.shown[-1]).mean() <= (
        case.tolerance)


@pytest.mark.parametrize('key', BAD)
def test_these_are_bad_videos_that_say_why(corpus, key):
  case = corpus[key]
  video = video_io.VideoFile(case.path)
  with pytest.raises(clip_lib.BadVideoError, match=f'^{_reason(case)}$'):
    _ = video.num_frames
  with pytest.raises(clip_lib.BadVideoError, match=f'^{_reason(case)}$'):
    video.frames(np.array([0]))


def test_an_unreadable_file_is_really_unreadable(corpus):
  """The permission case is not simulated: opening it fails in this
  process (as root, through a file the kernel refuses even root)."""
  with pytest.raises(PermissionError):
    open(corpus['unreadable'].path, 'rb').close()  # pylint: disable=consider-using-with


def test_a_variable_frame_rate_gives_the_frame_shown_at_each_time(corpus):
  """Frame i is the last frame whose timestamp is at most i / fps, for
  any set of indices (seeks, skipped frames and B-frames included)."""
  path = corpus['vfr'].path
  video = video_io.VideoFile(path)
  assert video.fps == pytest.approx(
      len(mv.VFR_TIMES_MS) / (mv.VFR_DURATION_MS / 1000))
  shown = mv.shown_at(mv.VFR_TIMES_MS, video.fps, video.num_frames)
  # Frames 2, 7, 9 and 11 follow others within a frame period: never shown.
  assert shown == [0, 1, 3, 3, 4, 5, 6, 6, 6, 6, 8, 10]
  for indices in ([9], [2, 9], [5, 11], [8, 9, 10], [11, 0], list(range(12))):
    got = video_io.decode(path, indices)
    levels = np.round(got.reshape(len(got), -1).mean(1) / 16).astype(int)
    assert levels.tolist() == [shown[i] for i in indices], indices


def _asymmetric_frames(n=3, height=24, width=40):
  """Frames with a different colour in three corners (and the frame
  index in the fourth), so any turn or mirror shows: uint8
  `[n, H, W, 3]`."""
  frames = np.zeros((n, height, width, 3), np.uint8)
  frames[:, :8, :8] = (255, 0, 0)
  frames[:, :8, -8:] = (0, 255, 0)
  frames[:, -8:, :8] = (0, 0, 255)
  frames[:, -8:, -8:, 0] = (60 * np.arange(n))[:, None, None]
  return frames


@pytest.mark.parametrize('rotation', [0, 90, 180, 270])
@pytest.mark.parametrize('hflip', [False, True])
def test_rotated_videos_come_out_upright(tmp_path, rotation, hflip):
  """A display matrix (written with PyAV's `set_display_rotation`, which
  mp4 stores as the track matrix) turns and mirrors the decoded frames as
  a player (FFmpeg's autorotation) does: counterclockwise, then mirrored."""
  stored = _asymmetric_frames()
  path = str(tmp_path / 'turned.mp4')
  mv.encode(path, stored, pix_fmt='yuv444p', rotation=rotation, hflip=hflip)
  expected = np.rot90(stored, rotation // 90, axes=(1, 2))
  expected = expected[:, :, ::-1] if hflip else expected
  video = video_io.VideoFile(path)
  assert video.frame_size == expected.shape[1:3]
  header = video.header
  assert (header.turns, header.mirror) == (rotation // 90, hflip)
  decoded = video.frames(np.arange(3))
  assert decoded.shape == expected.shape
  assert np.abs(decoded.astype(int) - expected).mean() < 3


def test_display_orientation_reads_ffmpeg_display_matrices():
  one = 1 << 16
  assert video_io.display_orientation(None) == (0, False)
  assert video_io.display_orientation(
      [one, 0, 0, 0, one, 0, 0, 0, 1 << 30]) == (0, False)
  # av_display_rotation_set(-90): a counterclockwise quarter turn.
  assert video_io.display_orientation(
      [0, -one, 0, one, 0, 0, 0, 0, 1 << 30]) == (1, False)
  # Fixed-point rounding leaves a unit or two where a 0 belongs.
  assert video_io.display_orientation(
      [2, one, 0, -one, -1, 0, 0, 0, 1 << 30]) == (3, False)
  assert video_io.display_orientation(
      [-one, 0, 0, 0, one, 0, 0, 0, 1 << 30]) == (0, True)
  # 45 degrees: not a quarter turn, shown as coded.
  half = round(one / 2 ** 0.5)
  assert video_io.display_orientation(
      [half, half, 0, -half, half, 0, 0, 0, 1 << 30]) == (0, False)


def _source(corpus):
  """Every case, labelled by its position in `BAD + GOOD`."""
  keys = BAD + GOOD
  return video_files.FileSource(
      [video_files.Entry(corpus[k].path, i) for i, k in enumerate(keys)])


def _skip_reasons(records) -> list[tuple[int, str]]:
  """`(index, message)` of each of the pipeline's 'Skipping video'
  warnings."""
  return [(r.args[0], str(r.args[1])) for r in records
          if r.msg.startswith('Skipping video')]


def test_training_and_evaluation_skip_the_bad_files_and_keep_the_rest(
    corpus, caplog):
  source = _source(corpus)
  good_labels = set(range(len(BAD), len(BAD) + len(GOOD)))
  caplog.set_level(logging.WARNING)
  skipped = ip.SkipCounter()
  batches = ip.train_batches(source, SPEC, 4, seed=0, skipped=skipped,
                             num_workers=2)
  epoch = [next(batches) for _ in range(len(source) // 4)]
  batches.close()
  labels = np.concatenate([b['labels'] for b in epoch])
  # Every good video is read in an epoch; a bad one gives way to the next.
  assert set(labels.tolist()) == good_labels
  assert all(b['clips'].shape == (4, 4, 16, 16, 3) for b in epoch)
  assert len(skipped) == len(BAD)
  reasons = dict(_skip_reasons(caplog.records))
  assert sorted(reasons) == list(range(len(BAD)))
  for i, key in enumerate(BAD):
    assert re.fullmatch(f'BadVideoError: {_reason(corpus[key])}',
                        reasons[i]), reasons[i]
  # Batch s is a function of (seed, s): a resumed run reads the same.
  resumed = next(ip.train_batches(source, SPEC, 4, seed=0, start_step=2,
                                  num_workers=2))
  for key in ('clips', 'labels'):
    np.testing.assert_array_equal(resumed[key], epoch[2][key])

  eval_skipped = ip.SkipCounter()
  evals = list(ip.eval_batches(source, SPEC, 4, skipped=eval_skipped,
                               num_workers=2))
  kept = np.concatenate([b['labels'][b['mask']] for b in evals])
  assert sorted(kept.tolist()) == sorted(good_labels)
  assert len(eval_skipped) == len(BAD)


class _StalledVideo:
  """A video whose decoding never returns (until `release` is set)."""

  def __init__(self, release: threading.Event):
    self.release = release
    self.num_frames, self.fps = 16, 25.0

  def frames(self, indices):
    self.release.wait(120)
    raise clip_lib.BadVideoError('released at the end of the test')


class _WithOne:
  """`source`, with video `index` replaced by `make()`."""

  def __init__(self, source, index, make):
    self.source, self.index, self.make = source, index, make

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if i == self.index:
      return self.make(), 99
    return self.source[i]


def _failing():
  raise clip_lib.BadVideoError('fails at once')


@pytest.fixture
def release():
  """Set at the end of a test: frees the threads it left stalled."""
  event = threading.Event()
  yield event
  event.set()


def test_a_stalled_decoder_counts_its_video_bad_and_the_rest_goes_on(
    corpus, release, caplog):
  """With threads: the stalled thread cannot be stopped and is left
  behind, but its video counts as bad after the time bound, and the
  batches are those of a run where that video fails at once."""
  good = video_files.FileSource([video_files.Entry(corpus[k].path, i)
                                 for i, k in enumerate(GOOD[:8])])
  spec = clip_lib.ClipSpec(**{**SPEC.__dict__, 'decode_timeout_s': 1.0})
  stalled = _WithOne(good, 3, lambda: _StalledVideo(release))
  failing = _WithOne(good, 3, _failing)
  caplog.set_level(logging.WARNING)
  runs = {}
  for name, source in (('stalled', stalled), ('failing', failing)):
    skipped = ip.SkipCounter()
    tick = time.monotonic()
    batches = ip.train_batches(source, spec, 2, seed=1, skipped=skipped,
                               num_workers=2)
    train_batches = [next(batches) for _ in range(4)]  # An epoch.
    batches.close()
    eval_skipped = ip.SkipCounter()
    evals = list(ip.eval_batches(source, spec, 2, skipped=eval_skipped,
                                 num_workers=2))
    runs[name] = (train_batches + evals, (len(skipped), len(eval_skipped)),
                  time.monotonic() - tick)
  (stalled_batches, counts, took), failing = runs['stalled'], runs['failing']
  assert counts == failing[1] == (1, 1)
  assert took < 15  # Two stalls of 1 s, not a hang.
  for a, b in zip(stalled_batches, failing[0], strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  reasons = [m for i, m in _skip_reasons(caplog.records) if i == 3]
  assert any(re.fullmatch(
      r'DecodeTimeoutError: decoding stalled: no result within 1 s \(the '
      r'time bound; raise config\.data\.decode_timeout_s, or predict '
      r'--decode_timeout_s, if the storage is merely slow\)\.', m)
             for m in reasons), reasons


def _fifo(path: pathlib.Path) -> str:
  """A named pipe: opening it for reading waits, inside FFmpeg's C code,
  for a writer that never comes (a hung network file system)."""
  os.mkfifo(path)
  return str(path)


def _unblock(path: str):
  """Lets whatever still waits on the pipe `path` go (a writer comes and
  goes: the reader sees an empty stream)."""
  for _ in range(20):
    try:
      os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # No reader waits.
      return
    time.sleep(0.05)


@pytest.fixture
def stalling_file(tmp_path):
  path = _fifo(tmp_path / 'stalled.mp4')
  yield path
  _unblock(path)


def test_a_file_stalled_inside_ffmpeg_does_not_hold_up_the_others(
    corpus, stalling_file):
  """Thread workers, the stall in C code (FFmpeg opening a pipe no one
  writes to): the other files still load (their headers do not wait on
  it), and it counts as bad after the time bound."""
  entries = [video_files.Entry(corpus[k].path, i)
             for i, k in enumerate(GOOD[:4])]
  entries.insert(1, video_files.Entry(stalling_file, 9))
  spec = clip_lib.ClipSpec(**{**SPEC.__dict__, 'decode_timeout_s': 1.0})
  skipped = ip.SkipCounter()
  tick = time.monotonic()
  evals = list(ip.eval_batches(video_files.FileSource(entries), spec, 2,
                               skipped=skipped, num_workers=1))
  assert time.monotonic() - tick < 10
  kept = np.concatenate([b['labels'][b['mask']] for b in evals])
  assert kept.tolist() == [0, 1, 2, 3] and len(skipped) == 1


@pytest.fixture(scope='session')
def checkpoint(tmp_path_factory):
  """A tiny model's training checkpoint (random weights, ten named
  classes): what `predict` reads."""
  config = config_lib.get_config('divided', 'tiny')
  config.model.depth = 1
  config.data.class_names = tuple(f'class {i}' for i in range(10))
  config.data.test_num_crops = 1
  workdir = tmp_path_factory.mktemp('checkpoint')
  state = jax.tree.map(jnp.asarray, train.create_train_state(
      config, jax.random.key(0), 10))
  manager = checkpoints.training.checkpoint_manager(str(workdir), config)
  checkpoints.training.save(manager, state, config)
  manager.wait_until_finished()
  return str(workdir / 'checkpoints')


def _predict(capsys, checkpoint, paths, *flags):
  status = cli.call(predict.main, ['predict', f'--checkpoint={checkpoint}',
                                   '--json', *flags, *paths])
  captured = capsys.readouterr()
  return status, captured.err.strip().splitlines(), json.loads(captured.out)


def _assert_lines(lines, patterns):
  assert not any('Traceback' in line for line in lines), lines
  assert len(lines) == len(patterns), lines
  for pattern, line in zip(patterns, lines, strict=True):
    assert re.fullmatch(pattern, line), line


def _assert_nothing_else_lost(paths, document, alone):
  """Every file that decodes is classified as it is alone; the others
  have their error and no classes."""
  assert [v['path'] for v in document['videos']] == paths
  by_path = {v['path']: v for v in alone['videos']}
  for video in document['videos']:
    if video['path'] not in by_path:
      assert video['error'] and not video['top_k'], video
      continue
    expected = by_path[video['path']]
    assert video['error'] is None and video['views'] == expected['views']
    assert [t['index'] for t in video['top_k']] == [
        t['index'] for t in expected['top_k']]
    np.testing.assert_allclose(
        [t['probability'] for t in video['top_k']],
        [t['probability'] for t in expected['top_k']], atol=1e-6)


def _good_alone(capsys, checkpoint, corpus, *flags):
  paths = [corpus[k].path for k in GOOD]
  status, errors, document = _predict(capsys, checkpoint, paths, *flags)
  assert status == 0 and not errors
  assert [v['path'] for v in document['videos']] == paths
  assert all(len(v['top_k']) == 5 for v in document['videos'])
  return document


def test_predict_names_each_bad_file_in_one_line_and_classifies_the_rest(
    corpus, checkpoint, capsys):
  """Without a time bound, decoding in this process."""
  cases = [corpus[k] for k in BAD + GOOD]
  paths = [c.path for c in cases]
  status, errors, document = _predict(capsys, checkpoint, paths,
                                      '--decode_timeout_s=0')
  assert status == 1
  _assert_lines(errors, [f'predict: error: {_reason(c)}'
                         for c in cases if c.reason is not None])
  alone = _good_alone(capsys, checkpoint, corpus, '--decode_timeout_s=0')
  _assert_nothing_else_lost(paths, document, alone)
  assert mv.UNICODE_NAME in alone['videos'][GOOD.index('unicode')]['path']


@pytest.mark.slow
def test_predict_gives_up_on_a_stalled_file_and_says_why(
    corpus, checkpoint, stalling_file, capsys):
  """The default path: files decode in a worker process. The stalled file
  holds it inside FFmpeg (opening a pipe no one writes to) until it is
  killed at the time bound; the next file gets a fresh one."""
  cases = [corpus[k] for k in BAD + GOOD]
  paths = [c.path for c in cases]
  paths.insert(len(BAD), stalling_file)
  tick = time.monotonic()
  status, errors, document = _predict(capsys, checkpoint, paths,
                                      '--decode_timeout_s=2')
  assert time.monotonic() - tick < 60  # The stalled file did not hang it.
  assert status == 1
  stalled = (
      rf'predict: error: {re.escape(stalling_file)}: decoding stalled: no '
      r'result within 2 s \(the time bound; raise '
      r'config\.data\.decode_timeout_s, or predict --decode_timeout_s, if '
      r'the storage is merely slow\)\.')
  _assert_lines(errors, [f'predict: error: {_reason(c)}'
                         for c in cases if c.reason is not None] + [stalled])
  _assert_nothing_else_lost(paths, document,
                            _good_alone(capsys, checkpoint, corpus))


def _workers_of(process: psutil.Process) -> list[psutil.Process]:
  """The decoding worker processes: the fork server's children."""
  return [c for server in process.children() for c in server.children()]


@pytest.mark.slow
def test_a_decoder_process_that_dies_fails_its_video_only(corpus,
                                                          stalling_file):
  """A worker that ends mid-video (a decoder's crash; here killed) fails
  that video with the reason, and the next video gets a fresh worker."""
  spec = clip_lib.ClipSpec(**{**SPEC.__dict__, 'decode_timeout_s': 60.0})
  videos = [video_io.VideoFile(stalling_file),
            video_io.VideoFile(corpus['short'].path)]
  me = psutil.Process()

  def kill_the_worker():
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      workers = _workers_of(me)
      if workers:
        time.sleep(0.5)  # Stuck opening the pipe by now.
        for worker in workers:
          worker.kill()
        return
      time.sleep(0.05)

  killer = threading.Thread(target=kill_the_worker)
  killer.start()
  errors = {}
  batches = list(long_video.clip_batches(
      videos, spec, long_video.Coverage(num_clips=2), 4, errors))
  killer.join()
  assert errors == {0: 'the worker process decoding it ended (exit code '
                       '-9).'}
  assert len(batches) == 1 and batches[0]['mask'].tolist() == [
      True, True, False, False]
  assert batches[0]['video'][:2].tolist() == [1, 1]


@pytest.mark.slow
def test_a_stalled_worker_process_is_killed_and_replaced(
    corpus, stalling_file, caplog):
  """With one worker process: the file stalls it inside FFmpeg (opening a
  pipe no one writes to); it is killed at the time bound and a fresh one
  loads the rest, giving the batches that threads give."""
  entries = [video_files.Entry(corpus[k].path, i)
             for i, k in enumerate(GOOD[:5])]
  entries.insert(2, video_files.Entry(stalling_file, 9))
  source = video_files.FileSource(entries)
  spec = clip_lib.ClipSpec(**{**SPEC.__dict__, 'decode_timeout_s': 2.0})
  caplog.set_level(logging.WARNING)
  runs = {}
  for worker_type in ('process', 'thread'):
    runs[worker_type] = read_both_loaders(source, spec, 2, 3, 1, worker_type)
    _unblock(stalling_file)  # Frees the thread left stalled.
  assert runs['process'][1:] == runs['thread'][1:] == (1, 1)
  for a, b in zip(runs['process'][0], runs['thread'][0], strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert 'Killing a loader worker process stuck past the time bound' in (
      caplog.text)
  assert 'DecodeTimeoutError: decoding stalled' in caplog.text


@pytest.mark.slow
def test_a_training_job_skips_the_corpus_bad_files_and_a_stalled_one(
    corpus, stalling_file, tmp_path):
  """The main job over the whole corpus (Kinetics' CSV layout, worker
  processes): it ends, counting each bad file and the stalled one once in
  training and once in evaluation, and evaluates every other video."""
  data = tmp_path / 'data'
  data.mkdir()
  entries = [video_files.Entry(corpus[k].path, i % 4)
             for i, k in enumerate(BAD + GOOD)]
  entries.append(video_files.Entry(stalling_file, 0))
  entries += [video_files.Entry(corpus[k].path, 1) for k in GOOD[:3]]
  for split in ('train', 'test'):
    kinetics.write_csv(str(data / f'{split}.csv'), entries, str(data))
  config = config_lib.get_config('divided', 'demo')
  config.data.dataset = 'kinetics400'
  config.data.data_dir = str(data)
  config.data.decode_timeout_s = 3.0
  config.data.num_workers = 2
  config.model.num_classes = 4
  config.model.depth = 1
  config.batch_size = config.eval_batch_size = 4
  config.num_train_steps = len(entries) // 4  # One epoch: all are read.
  config.data.test_num_crops = 1
  results = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert results['step'] == config.num_train_steps
  assert results['skipped_videos'] == 2 * (len(BAD) + 1)
  # Its evaluation is prediction's over the files that decode.
  assert results == pytest.approx(
      results | predicted_metrics(tmp_path / 'work'), abs=1e-6)
