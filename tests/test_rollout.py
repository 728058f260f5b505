"""Attention rollout against a brute-force reference, on a trained model,
and the visualize CLI end to end.

The reference rollout knows nothing of groups, padding or einops. For every
attention step it takes the step's input tokens (caught on the way into the
module), recomputes LayerNorm, queries and keys from the parameters in
float64, and runs one softmax over the flat token list with a mask built
from the (t, h, w) coordinates of each (query, key) pair. A class token that
takes part becomes one copy per set of mutually attending patches (the
frame's own class token for `space_only`), and the copies' rows are folded
back into the class token's row as the model folds their outputs.
"""

import dataclasses
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

import tsformer_jax
from tsformer_jax import attention
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import model as model_lib
from tsformer_jax import rollout
from tsformer_jax import video_io
from tsformer_jax import visualize
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_writer

from conftest import SCHEMES
from conftest import random_clips
from conftest import reference_masks
from conftest import tiny_config

# Odd in every axis: `global` pads time, height and width, `local` height
# and width.
ODD = dict(num_frames=3, image_size=(40, 24))  # grid 3 x 5 x 3
# One patch high: half of `local`'s windows and of `global`'s parity groups
# hold padding only and must not count in the class token's average.
THIN = dict(num_frames=3, image_size=(8, 40))  # grid 3 x 1 x 5


def _random_params(model, clips, seed=0):
  """Parameters of `model` drawn large enough for peaked attention (query
  and key logits of std ~1.5): near-uniform weights would hide a key put in
  the wrong place. No initialiser is compiled, only shapes traced."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), clips)['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == 'scale':  # LayerNorm
      return (1.0 + rng.normal(0.0, 0.1, leaf.shape)).astype(np.float32)
    return rng.normal(0.0, 0.15, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _rollout_and_step_inputs(model, params, clips):
  """`rollout.rollout` of one forward pass, and each attention step's inputs
  `(cls, x)` by module path, in one compiled function."""
  scheme = attention.get_scheme(model.attention)

  def forward(params, clips):
    inputs = {}

    def catch(next_fun, args, kwargs, context):
      if (isinstance(context.module, model_lib.AttentionStep) and
          context.method_name == '__call__'):
        inputs[context.module.path] = args[:2]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(catch):
      _, state = model.apply({'params': params}, clips,
                             mutable=['attention'])
    return rollout.rollout(state['attention'], scheme, model.grid), inputs
  return jax.jit(forward)(params, clips)


def _layer_norm(z, p, eps):
  mean = z.mean(-1, keepdims=True)
  var = ((z - mean) ** 2).mean(-1, keepdims=True)
  return (z - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _reference_step_matrix(cls, x, p, step, grid, eps):
  """The step's head-averaged attention over [class tokens; patches].

  cls: [B, C, D], x: [B, T, N, D] (the step's inputs), p: its params.
  Returns float64 [B, C + T * N, C + T * N].
  """
  b, c = cls.shape[:2]
  allowed, mask, g = reference_masks(step.grouping, grid, step.with_cls)
  n = len(allowed)
  size = c + n
  # Extended token list: [copies; patches]; copy i is class token `owner[i]`.
  owner = [i if c > 1 else 0 for i in range(g)]
  assert c in (1, g) or not g
  tokens = np.concatenate(
      [cls.astype(np.float64)[:, owner],
       x.astype(np.float64).reshape(b, n, -1)], axis=1)
  qkv = np.einsum('bld,dkhe->blkhe', _layer_norm(tokens, p['norm'], eps),
                  p['qkv']['kernel']) + p['qkv']['bias']
  q, k = qkv[:, :, 0], qkv[:, :, 1]
  logits = np.einsum('bqhe,bkhe->bhqk', q, k) / math.sqrt(q.shape[-1])
  logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = (weights / weights.sum(-1, keepdims=True)).mean(axis=1)
  # Fold the copies back: their columns onto their class token's column,
  # their rows into its row (averaged when one token has several copies).
  to_token = np.zeros((g + n, size))
  for i in range(g):
    to_token[i, owner[i]] = 1.0
  to_token[g:, c:] = np.eye(n)
  from_token = np.zeros((size, g + n))
  for i in range(g):
    from_token[owner[i], i] = 1.0 / owner.count(owner[i])
  from_token[c:, g:] = np.eye(n)
  matrix = from_token @ weights @ to_token
  if not step.with_cls:
    matrix[:, :c, :c] = np.eye(c)
  return matrix


def _reference_rollout(inputs, params, scheme, grid, depth, eps):
  result = None
  for i in range(depth):
    for step in scheme.steps:
      name = f'{step.grouping}_attention'
      cls, x = (np.asarray(a) for a in inputs[(f'block_{i}', name)])
      p = jax.tree.map(np.float64, params[f'block_{i}'][name])
      a = _reference_step_matrix(cls, x, p, step, grid, eps)
      flow = 0.5 * a + 0.5 * np.eye(a.shape[-1])
      result = flow if result is None else flow @ result
  return result


@pytest.mark.parametrize('scheme_name,sizes', [
    *(pytest.param(s, ODD, id=f'{s}-3x5x3') for s in SCHEMES),
    pytest.param('sparse_local_global', THIN, id='sparse_local_global-3x1x5'),
])
def test_rollout_matches_brute_force(scheme_name, sizes):
  config = tiny_config(scheme_name, **sizes)
  model = tsformer_jax.create_model(config)
  clips = random_clips(config, batch_size=2)
  params = _random_params(model, clips)
  scheme = attention.get_scheme(scheme_name)
  grid = model.grid
  n = grid[0] * grid[1] * grid[2]
  got, inputs = _rollout_and_step_inputs(model, params, clips)
  got = np.asarray(got)
  want = _reference_rollout(inputs, params, scheme, grid, model.depth,
                            model.layer_norm_eps)
  c = grid[0] if scheme.per_frame else 1
  assert got.shape == want.shape == (2, c + n, c + n)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  # The heatmap is the (averaged) class rows over the patches.
  heat = np.asarray(rollout.cls_heatmaps(got, grid, c))
  np.testing.assert_allclose(
      heat, want[:, :c, c:].mean(1).reshape(2, *grid), atol=1e-5)
  importance = np.asarray(rollout.temporal_importance(heat))
  np.testing.assert_allclose(
      importance, heat.sum((2, 3)) / heat.sum((1, 2, 3))[:, None], atol=1e-6)


def _motion_clips(config, count):
  """Test clips of synthetic_motion as evaluation samples them, and where
  the square is: float32 `[B, T, H, W, 3]`, bool `[B, T, H, W]`."""
  spec = clip_lib.clip_spec(config)
  clips, squares = [], []
  for index in range(count):
    frames, _ = synthetic_motion.generate('test', index)
    video = clip_lib.ArrayVideo(frames)
    clips.append(clip_lib.eval_views(video, spec)[0])
    shown = frames[clip_lib.temporal_indices(len(frames), video.fps,
                                             spec, clip=0)]
    # The square is painted over the noise in synthetic_motion's exact
    # colours; the background (at most 60 plus noise of std 8) never reaches
    # 230 in any channel. Demo frames are the clip's size: no crop to undo.
    square = np.zeros(shown.shape[:3], bool)
    for colour in ((230, 60, 60), (60, 90, 230)):
      square |= (shown == np.array(colour, np.uint8)).all(-1)
    squares.append(square)
  return np.stack(clips), np.stack(squares)


def _pixel_heatmaps(model, params, clips):
  """The rollout heatmaps with each pixel given its patch's value:
  `[B, T, H, W]`."""
  _, state = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, mutable=['attention']))(params, clips)
  flow = rollout.rollout(state['attention'], 'divided', model.grid)
  heat = np.asarray(rollout.cls_heatmaps(flow, model.grid, 1))
  p = model.patch_size
  return heat.repeat(p, axis=2).repeat(p, axis=3)


def _inside_outside_ratio(pixels, squares):
  """Heatmap mass per pixel inside the squares over that outside them."""
  inside = (pixels * squares).sum() / squares.sum()
  outside = (pixels * ~squares).sum() / (~squares).sum()
  return inside / outside


def test_trained_rollout_finds_the_moving_square(demo_workdir):
  config, params = checkpoints.load_checkpoint(
      str(demo_workdir / 'checkpoints'))
  model = tsformer_jax.create_model(config)
  clips, squares = _motion_clips(config, 16)
  assert squares.any(axis=(2, 3)).all()  # the square is in every frame
  pixels = _pixel_heatmaps(model, params, clips)
  # Measured 1.88 for the 320-step demo model (1.54 to 2.21 per clip).
  ratio = _inside_outside_ratio(pixels, squares)
  assert ratio > 1.4
  # Against the squares of the other clips, 1.10 to 1.28 (squares stay
  # clear of the borders): the heatmap follows this clip's square.
  elsewhere = max(_inside_outside_ratio(pixels, np.roll(squares, k, axis=0))
                  for k in range(1, len(squares)))
  assert ratio > 1.3 * elsewhere


def _run_cli(*args):
  return subprocess.Popen(
      [sys.executable, '-m', 'tsformer_jax.visualize', *args],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_visualize_cli(tmp_path):
  config = tiny_config('divided', num_classes=2)
  config.data.dataset = 'synthetic_motion'
  model = tsformer_jax.create_model(config)
  params = _random_params(model, random_clips(config, batch_size=1))
  checkpoint = checkpoints.save_checkpoint(str(tmp_path / 'ckpt'), config,
                                           params)
  frames, _ = synthetic_motion.generate('test', 3)
  video = str(tmp_path / 'clip.mp4')
  video_writer.write_mp4(video, frames)
  out = tmp_path / 'out'
  # Started together: each run spends most of its time importing.
  good = _run_cli(f'--checkpoint={checkpoint}', video, f'--out={out}')
  bad = _run_cli(f'--checkpoint={checkpoint}', str(tmp_path / 'nothing.mp4'),
                 f'--out={out}')
  good_out, good_err = good.communicate(timeout=300)
  _, bad_err = bad.communicate(timeout=300)

  assert good.returncode == 0, good_err
  # The label the CLI prints is the in-process prediction's.
  found = visualize.explain(config, params, video_io.VideoFile(video))
  label = synthetic_motion.CLASSES[int(np.argmax(found.probabilities))]
  assert f'predicted: {label} (' in good_out
  for name in (visualize.FRAMES_PNG, visualize.GIF,
               visualize.IMPORTANCE_PNG):
    assert f'wrote {out / name}' in good_out
  for name in (visualize.FRAMES_PNG, visualize.IMPORTANCE_PNG):
    with Image.open(out / name) as image:
      assert image.format == 'PNG'
      image.verify()
  with Image.open(out / visualize.GIF) as gif:
    assert gif.format == 'GIF'
    assert gif.n_frames == config.model.num_frames == 4

  # One line on stderr, last, and a non-zero exit.
  assert bad.returncode != 0
  last = bad_err.strip().splitlines()[-1]
  assert last == (f'visualize: error: No video file at '
                  f'{tmp_path / "nothing.mp4"}.')


def test_visualize_errors_name_the_problem(tmp_path):
  garbage = tmp_path / 'garbage.mp4'
  garbage.write_bytes(b'not a video' * 100)
  out = str(tmp_path / 'out')
  # The video is probed before the checkpoint is read: any path will do.
  with pytest.raises(clip_lib.BadVideoError, match='garbage.mp4'):
    visualize.visualize(str(tmp_path), str(garbage), out)
  with pytest.raises(FileNotFoundError, match='No checkpoint at .*nothing'):
    visualize.visualize(str(tmp_path / 'nothing'), str(garbage), out)
  assert not os.path.exists(out)


@pytest.mark.parametrize('flags, message', [
    (['--out={tmp}/out', '--json'], '--json is not a flag of visualize (it '
     'takes: --checkpoint, --out, --overwrite, and those visualize --help '
     'lists).'),
    (['--out={tmp}/out', '--alpha=1.5'],
     'flag --alpha=1.5: 1.5 is not a number in the range [0.0, 1.0]'),
    (['--out={tmp}/out', '--frame_ms=-1'],
     'flag --frame_ms=-1: -1 is not a non-negative integer'),
    # Images of an earlier run are kept unless --overwrite.
    (['--out={tmp}/old'], '{tmp}/old already holds rollout.gif: pass '
     '--overwrite to replace them, or name another --out.'),
    (['--out={tmp}/old', '--overwrite'], 'No checkpoint at {tmp}/none'),
    (['--out={tmp}/old/rollout.gif', '--overwrite'],
     '{tmp}/old/rollout.gif is a file: the images go in a folder; name '
     'another.'),
])
def test_visualize_cli_refuses_flags_it_cannot_honour_before_any_compute(
    tmp_path, capsys, flags, message):
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / visualize.GIF).write_bytes(b'kept')
  status = cli.call(visualize.main, [
      'visualize', f'--checkpoint={tmp_path}/none', f'{tmp_path}/a.mp4',
      *[flag.format(tmp=tmp_path) for flag in flags]])
  lines = capsys.readouterr().err.strip().splitlines()
  assert status == (1 if '--overwrite' in flags else 2)
  assert len(lines) == 1 and lines[0].startswith(
      'visualize: error: ' + message.format(tmp=tmp_path)), lines
  assert (tmp_path / 'old' / visualize.GIF).read_bytes() == b'kept'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['old']


def test_sample_clip_is_the_evaluation_view():
  config = tiny_config('divided', image_size=(24, 32))
  config.data.train_scales = (24, 30)  # One crop: first to the smallest.
  spec = clip_lib.clip_spec(config)
  # Already at the short side: the centre crop cuts 4 columns each side.
  frames = np.random.default_rng(0).integers(0, 256, (20, 24, 40, 3),
                                             np.uint8)
  video = clip_lib.ArrayVideo(frames)
  indices, shown, clip = visualize.sample_clip(video, spec)
  one_view = clip_lib.eval_views(
      video, dataclasses.replace(spec, num_clips=1, num_crops=1))
  np.testing.assert_array_equal(clip, one_view[0])
  # The centre clip of 20 frames: 4 frames spanning 8, from frame 6.
  np.testing.assert_array_equal(indices, [6, 8, 10, 13])
  np.testing.assert_array_equal(shown, frames[[6, 8, 10, 13], :, 4:36])
