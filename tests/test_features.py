"""Feature extraction (`extraction`, `feature_files`, `python -m
tsformer_jax.features`): windows, layers and pools, the folder on disk,
resuming, failures, bad input, several devices."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import evaluation
from tsformer_jax import extraction
from tsformer_jax import feature_files
from tsformer_jax import features
from tsformer_jax import video_io
from tsformer_jax.datasets import video_writer

from conftest import counting_frames
from conftest import frame_indices
from conftest import tiny_config
from conftest import tiny_params

ROOT = pathlib.Path(__file__).parent.parent


def _config(scheme='divided', timeout=0):
  """The tiny model on 32 x 32 frames: 4 frames 2 apart (a window spans 8
  source frames); decoding in this process unless `timeout`."""
  config = tiny_config(scheme)
  config.data.train_scales = (32, 40)
  config.data.decode_timeout_s = timeout
  return config


def _reference_windows(video_frames, num_frames, rate, stride):
  """The rows' source frames, spelled out: windows from frame 0 every
  `stride` until one spans the last frame; past the end, the last frame."""
  rows, start = [], 0
  while True:
    rows.append([min(start + k * rate, video_frames - 1)
                 for k in range(num_frames)])
    if start + num_frames * rate >= video_frames:
      return rows
    start += stride


@pytest.mark.parametrize('frames', [1, 5, 8, 9, 20, 23, 64])
@pytest.mark.parametrize('stride', [1, 3, 4, 8, 16])
def test_windows_start_every_stride_and_reach_the_end(frames, stride):
  indices = extraction.window_indices(frames, 4, 2, stride)
  assert indices.tolist() == _reference_windows(frames, 4, 2, stride)
  assert len(indices) == extraction.window_count(frames, 8, stride)
  with pytest.raises(clip_lib.BadVideoError, match='no frames'):
    extraction.window_indices(0, 4, 2, stride)


def test_layers_name_blocks_or_the_final_norm():
  assert [extraction.block_index(k, 2) for k in (-1, 0, 1, -2, -3)] == [
      None, 0, 1, 1, 0]
  for layer in (2, -4):
    with pytest.raises(ValueError, match=r'^--layer=.* out of range for a '
                       r'2-block model: give -3 to 1 \(-1'):
      extraction.block_index(layer, 2)


def _layer_norm(x, params, eps=1e-6):
  x = np.asarray(x, np.float64)
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * params['scale'] + params['bias']


def _captured(config, params, clips):
  """Every block's `(cls [B, C, D], x [B, T, N, D])` and the final norm's
  output, from one forward pass capturing everything."""
  model = tsformer_jax.create_model(config)

  def forward(params, clips):
    normalised = clip_lib.device_normalize(clips, config.data.mean,
                                           config.data.std)
    return model.apply({'params': params}, normalised,
                       capture_intermediates=True,
                       mutable=['intermediates'])[1]['intermediates']

  inter = jax.jit(forward)(params, clips)
  blocks = [jax.tree.map(np.asarray, inter[f'block_{i}']['__call__'][0])
            for i in range(config.model.depth)]
  return blocks, np.asarray(inter['norm']['__call__'][0])


# (layer, pool) pairs checked; each compiles, so the second scheme, where
# only the class token differs, takes two.
_PAIRS = {'divided': [(-1, 'cls'), (-1, 'mean'), (-1, 'tokens'),
                      (0, 'tokens'), (-2, 'cls'), (-3, 'mean')],
          'space_only': [(-1, 'cls'), (0, 'cls')]}


@pytest.mark.slow
@pytest.mark.parametrize('scheme', ['divided', 'space_only'])
def test_layers_and_pools_equal_the_models_own_outputs(scheme):
  config = _config(scheme)
  params = tiny_params(scheme)
  clips = np.random.default_rng(0).uniform(0, 255, (3, 4, 32, 32, 3)
                                           ).astype(np.float32)
  blocks, final = _captured(config, params, clips)
  # The reference of each output: the captured blocks (the class token
  # averaged over its copies, one per frame for space_only), and at -1
  # every token through the final norm (numpy, float64).
  normed = [blocks[-1][0].mean(1, keepdims=True), blocks[-1][1]]
  normed = [_layer_norm(z, params['norm']) for z in normed]
  outputs = {-1: normed, 0: blocks[0], 1: blocks[1], -2: blocks[1],
             -3: blocks[0]}
  for layer, pool in _PAIRS[scheme]:
    fn, used = extraction.feature_fn(config, params, layer, pool, 'float32')
    got = np.asarray(jax.jit(fn)(used, clips))
    cls, x = outputs[layer]
    expected = {'cls': np.asarray(cls).mean(1),
                'mean': np.asarray(x).mean((1, 2)),
                'tokens': np.asarray(x).reshape(3, 4, 4, 4, 64)}[pool]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5,
                               err_msg=f'layer {layer}, {pool}')
    if (layer, pool) == (-1, 'cls'):
      # What the head reads: evaluation's features, the model's own norm.
      forward = evaluation.forward_fn(config, with_features=True)
      np.testing.assert_allclose(got, forward(params, clips)['features'],
                                 atol=1e-5)
      np.testing.assert_allclose(got, final, atol=1e-5)
  # Blocks past the one read are not run; float16 rounds the same values.
  fn, used = extraction.feature_fn(config, params, 0, 'cls', 'float16')
  assert sorted(used) == sorted(k for k in params if k != 'block_1')
  half = np.asarray(jax.jit(fn)(used, clips))
  assert half.dtype == np.float16
  np.testing.assert_allclose(half, blocks[0][0].mean(1), rtol=2e-3,
                             atol=2e-3)


def test_layer_norm_reference_is_flaxs():
  # The check above leans on this numpy LayerNorm.
  x = np.random.default_rng(1).normal(size=(2, 5, 64)).astype(np.float32)
  params = {'scale': np.linspace(0.5, 2, 64, dtype=np.float32),
            'bias': np.linspace(-1, 1, 64, dtype=np.float32)}
  flax_out = nn.LayerNorm(epsilon=1e-6).apply({'params': params}, x)
  np.testing.assert_allclose(_layer_norm(x, params), flax_out, atol=1e-5)


def _write(path, frames, fps=30.0):
  path.parent.mkdir(parents=True, exist_ok=True)
  video_writer.write_mp4(str(path), frames, fps)
  return str(path)


def test_a_window_holds_the_frames_it_names(tmp_path):
  # Frame k of the video has brightness 8 k: each window's decoded, cropped
  # clip tells which frames it took.
  path = _write(tmp_path / 'count.mp4', counting_frames(23))
  spec = clip_lib.clip_spec(_config())
  items = list(extraction.window_stream(video_io.VideoFile(path), spec, 3))
  expected = _reference_windows(23, 4, 2, 3)
  assert items[0] == ('frames', 23, 30.0, len(expected)) == ('frames', 23,
                                                            30.0, 6)
  windows = items[1:]
  assert [k for _, k, _ in windows] == list(range(6))
  for (_, k, clip) in windows:
    assert clip.shape == (4, 32, 32, 3)
    assert frame_indices(clip) == expected[k]


LENGTHS = {'v0': 23, 'sub/v1': 9, 'v2': 40}  # Frames of `_entries`' videos.


def _entries(root, count=3):
  """`count` counting videos of `LENGTHS` under root/videos, at 25 fps."""
  for name in list(LENGTHS)[:count]:
    _write(root / 'videos' / f'{name}.mp4', counting_frames(LENGTHS[name]),
           25.0)
  return feature_files.folder_videos(str(root / 'videos'))


def _expected_rows(config, params, path, stride):
  """Each window's class-token features, from frames decoded window by
  window and evaluation's forward pass."""
  video = video_io.VideoFile(path)
  spec = dataclasses.replace(clip_lib.clip_spec(config), num_crops=1)
  forward = jax.jit(evaluation.forward_fn(config, with_features=True))
  rows = []
  for indices in _reference_windows(video.num_frames, 4, 2, stride):
    clip, = clip_lib.eval_crops(video.frames(np.asarray(indices)), spec)
    rows.append(np.asarray(forward(params, clip[None])['features'][0]))
  return np.stack(rows)


def _settings(stride=4, **kwargs):
  kwargs.setdefault('batch_size', 4)
  return extraction.Settings('ckpt', stride, **kwargs)


@pytest.mark.slow
def test_extract_writes_a_row_per_window_and_resumes(tmp_path):
  config, params = _config(), tiny_params()
  entries = _entries(tmp_path)
  assert [e.id for e in entries] == ['sub/v1', 'v0', 'v2']
  out = str(tmp_path / 'out')
  report = extraction.extract(config, params, entries, out, _settings(),
                              progress=False)
  assert (report.written, report.skipped, report.failed) == (3, 0, {})
  assert report.windows == sum(
      len(_reference_windows(n, 4, 2, 4)) for n in LENGTHS.values()) == 16
  for entry in entries:
    rows = np.load(f'{out}/{entry.id}.npy')
    np.testing.assert_allclose(
        rows, _expected_rows(config, params, entry.path, 4), atol=1e-5)
    frames = json.loads(pathlib.Path(f'{out}/{entry.id}.frames.json')
                        .read_text())
    assert frames == dict(path=entry.path, num_frames=LENGTHS[entry.id],
                          fps=25.0, windows=len(rows))
  doc = json.loads(pathlib.Path(f'{out}/features.json').read_text())
  assert doc == dict(checkpoint='ckpt', layer=-1, pool='cls',
                     stride_frames=4, window_frames=8, num_frames=4,
                     sampling_rate=2, dtype='float32', classes=None,
                     multi_label=False,
                     videos=[dict(id=e.id, path=e.path, labels=None)
                             for e in entries])
  assert pathlib.Path(f'{out}/failed.txt').read_text() == ''

  # A rerun skips what is done; a leftover partial file is not done.
  os.remove(f'{out}/v2.npy')
  pathlib.Path(f'{out}/v2.npy.partial').write_bytes(b'half')
  before = os.stat(f'{out}/v0.npy').st_mtime_ns
  report = extraction.extract(config, params, entries, out, _settings(),
                              progress=False)
  assert (report.written, report.skipped, report.windows) == (1, 2, 9)
  assert os.stat(f'{out}/v0.npy').st_mtime_ns == before
  assert not os.path.exists(f'{out}/v2.npy.partial')
  np.testing.assert_allclose(
      np.load(f'{out}/v2.npy'),
      _expected_rows(config, params, entries[2].path, 4), atol=1e-5)

  # Other settings into the same folder: one line, nothing written.
  with pytest.raises(ValueError, match=r'^\S+ holds features of other '
                     r"settings \(pool 'cls' there, 'mean' now\): use another"
                     r' --out, or the same settings to resume\.$'):
    extraction.extract(config, params, entries, out,
                       _settings(pool='mean'), progress=False)


def test_a_bad_video_is_listed_and_the_others_go_on(tmp_path):
  config, params = _config(timeout=30), tiny_params()
  _entries(tmp_path, count=2)
  corrupt = tmp_path / 'videos' / 'corrupt.mp4'
  corrupt.write_bytes(b'\x00\x00\x00\x18ftypmp42' + bytes(range(256)) * 4)
  (tmp_path / 'videos' / 'empty.webm').write_bytes(b'')
  entries = feature_files.folder_videos(str(tmp_path / 'videos'))
  out = tmp_path / 'out'
  seen = []
  report = extraction.extract(
      config, params, entries, str(out), _settings(pool='tokens',
                                                   dtype='float16'),
      progress=False, on_failure=lambda path, why: seen.append(path))
  assert report.written == 2
  assert sorted(report.failed) == sorted(seen) == [str(corrupt), str(
      tmp_path / 'videos' / 'empty.webm')]
  lines = (out / 'failed.txt').read_text().splitlines()
  assert sorted(line.split('\t')[0] for line in lines) == sorted(seen)
  assert all(len(line.split('\t')) == 2 and line.split('\t')[1]
             for line in lines)
  assert report.failed[str(tmp_path / 'videos' / 'empty.webm')] == (
      'empty file (0 bytes).')
  rows = np.load(out / 'v0.npy')
  assert rows.shape == (5, 4, 4, 4, 64) and rows.dtype == np.float16
  assert not (out / 'corrupt.npy').exists()


@pytest.mark.slow
def test_a_failure_not_of_a_video_stops_the_run(tmp_path, monkeypatch):
  def broken(video, spec, stride):
    raise RuntimeError('a bug, not a bad video')
    yield  # pylint: disable=unreachable

  monkeypatch.setattr(extraction, 'window_stream', broken)
  with pytest.raises(RuntimeError, match='a bug, not a bad video'):
    extraction.extract(_config(), tiny_params(), _entries(tmp_path, 1),
                       str(tmp_path / 'out'), _settings(), progress=False)
  assert (tmp_path / 'out' / 'failed.txt').read_text() == ''


def test_listings_give_ids_labels_and_one_line_errors(tmp_path):
  (tmp_path / 'a').mkdir()
  listing_path = tmp_path / 'train.csv'
  listing_path.write_text('a/x.mp4 run,jump\nb.webm jump\n')
  entries = feature_files.listed_videos(str(listing_path), ['jump', 'run'])
  assert [(e.id, e.labels) for e in entries] == [('a/x', (0, 1)),
                                                 ('b', (0,))]
  doc = feature_files.manifest(
      dict.fromkeys(feature_files.SETTINGS, 0), entries, ['jump', 'run'])
  assert doc['multi_label'] and doc['classes'] == ['jump', 'run']
  assert doc['videos'][0] == dict(id='a/x', path=str(tmp_path / 'a/x.mp4'),
                                  labels=[0, 1])
  # No labels at all: null, not empty lists.
  listing_path.write_text('a/x.mp4\n/elsewhere/deep/y.mp4\n')
  entries = feature_files.listed_videos(str(listing_path), [])
  assert [(e.id, e.labels) for e in entries] == [
      (os.path.relpath(tmp_path / 'a/x', '/'), None), ('elsewhere/deep/y',
                                                       None)]
  listing_path.write_text('a/x.mp4 run\nb.mp4 swim\n')
  with pytest.raises(ValueError, match=r'train.csv:2: unknown label '
                     r"'swim'"):
    feature_files.listed_videos(str(listing_path), ['jump', 'run'])
  listing_path.write_text('x.mp4 run\nx.webm run\n')
  with pytest.raises(ValueError, match=r'train.csv:2 \S+x.webm would write '
                     r'the same features as \S+x.mp4 \(line 1\): DIR/x.npy'):
    feature_files.listed_videos(str(listing_path), ['run'])


def test_a_folder_takes_its_video_files(tmp_path):
  for name in ('b/c.webm', 'a.MP4', '.hidden.mp4', 'notes.txt', '.x/d.mp4'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b'')
  assert [e.id for e in feature_files.folder_videos(str(tmp_path))] == [
      'a', 'b/c']
  (tmp_path / 'texts').mkdir()
  (tmp_path / 'texts' / 'notes.txt').write_text('')
  with pytest.raises(ValueError, match=r'^\S+/texts holds no video file'):
    feature_files.folder_videos(str(tmp_path / 'texts'))


def test_videos_split_over_processes():
  shares = [extraction.process_share(10, i, 3) for i in range(3)]
  assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
  assert sorted(sum(shares, [])) == list(range(10))


def _checkpoint(tmp_path):
  path = tmp_path / 'ckpt'
  if not path.exists():
    checkpoints.save_checkpoint(str(path), _config(), tiny_params())
  return str(path)


@pytest.mark.parametrize('args, message', [
    (['--pool=max'], "Unknown pool 'max'; valid: ['cls', 'mean', 'tokens']."),
    (['--dtype=bfloat16'], "Unknown dtype 'bfloat16'; valid: ['float32', "
     "'float16'] (numpy has no bfloat16)."),
    (['--layer=2'], '--layer=2 is out of range for a 2-block model: give -3 '
     'to 1 (-1: the final normalised output; 0 to 1: a block).'),
])
def test_cli_bad_settings_get_one_line(tmp_path, capsys, args, message):
  videos = tmp_path / 'videos'
  _write(videos / 'v.mp4', counting_frames(9))
  status = cli.call(features.main, [
      'features', f'--checkpoint={_checkpoint(tmp_path)}',
      f'--videos={videos}', f'--out={tmp_path / "out"}', '--stride_frames=4',
      *args])
  assert status == 2
  assert capsys.readouterr().err == f'features: error: {message}\n'


def test_cli_out_a_file_and_unknown_labels_get_one_line(tmp_path, capsys):
  (tmp_path / 'out').write_text('')
  base = ['features', f'--checkpoint={tmp_path}/none', '--stride_frames=4']
  assert cli.call(features.main, base + [
      f'--videos={tmp_path}', f'--out={tmp_path}/out']) == 2
  assert capsys.readouterr().err == (
      f'features: error: --out={tmp_path}/out is a file: name a folder (it '
      'is made if missing).\n')
  (tmp_path / 'list.csv').write_text('v.mp4 run\nw.mp4 fly\n')
  (tmp_path / 'classes.txt').write_text('run\nswim\n')
  status = cli.call(features.main, [
      'features', f'--checkpoint={_checkpoint(tmp_path)}',
      f'--videos={tmp_path}/list.csv', f'--out={tmp_path}/f',
      '--stride_frames=4'])
  assert status == 2
  err = capsys.readouterr().err
  assert err.startswith(f'features: error: {tmp_path}/list.csv:2: unknown '
                        "label 'fly'") and err.count('\n') == 1


@pytest.mark.slow
def test_cli_writes_labels_and_reports_failures(tmp_path, capsys):
  videos = tmp_path / 'videos'
  _write(videos / 'v.mp4', counting_frames(20))
  (videos / 'bad.mp4').write_bytes(b'')
  (videos / 'list.jsonl').write_text(
      '{"path": "v.mp4", "labels": ["run"]}\n{"path": "bad.mp4", '
      '"labels": ["swim", "run"]}\n')
  (videos / 'classes.txt').write_text('run\nswim\n')
  out = tmp_path / 'out'
  status = cli.call(features.main, [
      'features', f'--checkpoint={_checkpoint(tmp_path)}',
      f'--videos={videos}/list.jsonl', f'--out={out}', '--stride_frames=5',
      '--pool=mean', '--layer=0'])
  err = capsys.readouterr().err.splitlines()
  assert status == 1
  assert err[0] == (f'features: error: {videos}/bad.mp4: empty file '
                    '(0 bytes).')
  assert err[-1].startswith('features: 1 written, 0 already done, 1 failed')
  doc = json.loads((out / 'features.json').read_text())
  assert doc['classes'] == ['run', 'swim'] and doc['multi_label']
  assert [v['labels'] for v in doc['videos']] == [[0], [0, 1]]
  assert np.load(out / 'v.npy').shape == (4, 64)  # 1 + ceil(12 / 5) rows.


_DEVICES_SCRIPT = '''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, {tests!r})
import jax
from conftest import tiny_params
from test_features import _config, _settings
from tsformer_jax import extraction, feature_files
assert jax.local_device_count() == 4
entries = feature_files.folder_videos({videos!r})
report = extraction.extract(_config(), tiny_params(), entries, {out!r},
                            _settings(batch_size=6), progress=False)
print(report.written, report.windows)
'''


@pytest.mark.slow
def test_several_devices_write_what_one_does(tmp_path):
  entries = _entries(tmp_path)
  one = tmp_path / 'one'
  extraction.extract(_config(), tiny_params(), entries, str(one),
                     _settings(batch_size=6), progress=False)
  four = tmp_path / 'four'
  script = _DEVICES_SCRIPT.format(tests=str(ROOT / 'tests'),
                                  videos=str(tmp_path / 'videos'),
                                  out=str(four))
  done = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ['3', '16']  # In batches of 8 (6 rounded up).
  for entry in entries:
    np.testing.assert_allclose(np.load(four / f'{entry.id}.npy'),
                               np.load(one / f'{entry.id}.npy'), atol=1e-5)


@pytest.mark.slow
def test_two_processes_share_the_videos(tmp_path):
  entries = _entries(tmp_path)
  one = tmp_path / 'one'
  extraction.extract(_config(), tiny_params(), entries, str(one),
                     _settings(), progress=False)
  checkpoint = _checkpoint(tmp_path)
  runs = [subprocess.Popen(
      [sys.executable, '-m', 'tsformer_jax.features',
       f'--checkpoint={checkpoint}', f'--videos={tmp_path / "videos"}',
       f'--out={tmp_path / "two"}', '--stride_frames=4',
       '--windows_per_batch=4'],
      env=dict(os.environ, TSFORMER_NUM_PROCESSES='2',
               TSFORMER_PROCESS_ID=str(i)),
      cwd=ROOT, stderr=subprocess.PIPE, text=True) for i in range(2)]
  summaries = [run.communicate(timeout=600)[1].splitlines()[-1]
               for run in runs]
  assert [run.returncode for run in runs] == [0, 0], summaries
  # Videos 0 and 2 (in id order) to process 0, video 1 to process 1.
  assert summaries[0].startswith('features: 2 written, 0 already done')
  assert summaries[1].startswith('features: 1 written, 0 already done')
  for entry in entries:
    np.testing.assert_allclose(np.load(tmp_path / 'two' / f'{entry.id}.npy'),
                               np.load(one / f'{entry.id}.npy'), atol=1e-5)
  assert (json.loads((tmp_path / 'two' / 'features.json').read_text()) ==
          dict(json.loads((one / 'features.json').read_text()),
               checkpoint=checkpoint))
