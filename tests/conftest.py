"""Test helpers: tiny configs and their parameters, clips, jitted apply."""

import fcntl
import functools
import itertools
import math
import os

import jax
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import attention
from tsformer_jax import config_lib

SCHEMES = sorted(attention.SCHEMES)
# The default scheme in the fast tier, every scheme in the full suite: for
# the compile-heavy checks of each kernel and dtype.
DIVIDED_FIRST = ['divided'] + [pytest.param(s, marks=pytest.mark.slow)
                               for s in SCHEMES if s != 'divided']


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: runs a subprocess, a notebook or a training run, or '
      'compiles much (deselect with -m "not slow")')


def pytest_collection_modifyitems(items):
  # A test of the trained demo model waits for its training run.
  for item in items:
    if 'demo_workdir' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.slow)


def tiny_config(scheme='divided', **model):
  config = config_lib.get_config(scheme, 'tiny')
  config.model.update(model)
  return config


def tiny_params(scheme='divided', seed=0, **model):
  """Initialised parameters of `tiny_config(scheme, **model)`, cached:
  compiling the initialisers takes seconds on CPU."""
  return _tiny_params(scheme, seed, tuple(sorted(model.items())))


@functools.cache
def _tiny_params(scheme, seed, model):
  return tsformer_jax.init_params(tiny_config(scheme, **dict(model)),
                                  jax.random.key(seed))


def random_clips(config, batch_size=2, seed=0):
  m = config.model
  shape = (batch_size, m.num_frames) + tuple(m.image_size) + (3,)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def apply(model, params, clips, train=False, rng=None):
  """`model.apply` under jit (eager flax runs op by op and is slow on CPU)."""
  return _jitted_apply(model, train)(params, clips, rng)


@functools.cache
def _jitted_apply(model, train):
  def forward(params, clips, rng):
    rngs = {} if rng is None else {'dropout': rng}
    return model.apply({'params': params}, clips, train=train, rngs=rngs)
  return jax.jit(forward)


def hf_logits(model, clips):
  """Logits of a Hugging Face TimeSformer on our clips `[B, T, H, W, 3]`.

  HF's space_only classifies every frame on its own ([B * T] logits); the
  original TimeSformer averages the frames' class tokens before the final
  norm, which is what our model (and the paper's baseline) does. For it we
  take HF's encoder output and apply that average before its norm and head.
  """
  import torch  # pylint: disable=g-import-not-at-top
  pixels = torch.from_numpy(clips).permute(0, 1, 4, 2, 3)  # [B, T, 3, H, W]
  with torch.no_grad():
    if model.config.attention_type != 'space_only':
      return model(pixels).logits.numpy()
    hidden = model.timesformer(pixels, output_hidden_states=True)
    cls = hidden.hidden_states[-1][:, 0].reshape(
        clips.shape[0], clips.shape[1], -1).mean(1)
    return model.classifier(model.timesformer.layernorm(cls)).numpy()


# A divided demo model trained on synthetic_motion, shared by the tests that
# need a model that has learned something (prediction, rollout). Trained once
# per test run: pytest-xdist workers share the directory under a file lock.
DEMO_STEPS = 320


@pytest.fixture(scope='session')
def demo_workdir(tmp_path_factory):
  """The workdir of a finished divided demo training run (DEMO_STEPS)."""
  from tsformer_jax import train  # pylint: disable=g-import-not-at-top
  shared = tmp_path_factory.getbasetemp()
  # An xdist worker's base is one of the run's; without xdist (-p no:xdist)
  # there is no worker and no `worker_id` fixture.
  if 'PYTEST_XDIST_WORKER' in os.environ:
    shared = shared.parent
  workdir = shared / 'demo_divided'
  with open(shared / 'demo_divided.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / 'results.json').exists():
      config = config_lib.get_config('divided', 'demo')
      config.num_train_steps = DEMO_STEPS
      config.optimizer.learning_rate = 2e-3
      config.checkpoint_every_steps = DEMO_STEPS
      train.train_and_evaluate(config, str(workdir), mode='train')
  return workdir


def predicted_metrics(workdir):
  """Top-1 and top-5 of the last checkpoint in `workdir` over the readable
  videos of its config's evaluation split, from
  `evaluation.predict_videos`: the prediction path, which a training run's
  own evaluation must agree with."""
  from tsformer_jax import datasets  # pylint: disable=g-import-not-at-top
  from tsformer_jax import evaluation  # pylint: disable=g-import-not-at-top
  config, params = tsformer_jax.load_checkpoint(str(workdir / 'checkpoints'))
  source = datasets.get_source(config, config.data.eval_split)
  videos, labels = [], []
  for i in range(len(source)):
    try:
      video, label = source[i]
    except Exception:  # pylint: disable=broad-except
      continue  # Skipped by the training run's evaluation too.
    videos.append(video)
    labels.append(label)
  predictions = evaluation.predict_videos(config, params, videos)
  hits = [[label in [c for c, _ in p.top_k(k)] for k in (1, 5)]
          for p, label in zip(predictions, labels, strict=True)
          if p.error is None]
  top1, top5 = np.mean(hits, axis=0)
  return dict(eval_top1=top1, eval_top5=top5)


COUNT_STEP = 8  # Brightness step per frame of `counting_frames`.


def counting_frames(n, height=32, width=32):
  """Grey frames whose level is COUNT_STEP x their index: uint8
  `[n, H, W, 3]`, so that a decoded frame tells which one it is."""
  levels = COUNT_STEP * np.arange(n, dtype=np.uint8)
  return np.broadcast_to(levels[:, None, None, None],
                         (n, height, width, 3)).copy()


def frame_indices(frames):
  """The index each decoded `counting_frames` frame shows: `[F]` ints."""
  return np.round(frames.reshape(len(frames), -1).mean(1) / COUNT_STEP
                  ).astype(int).tolist()


# Which patches attend to which in each grouping, written from the paper's
# description alone: (t, h, w) of a query and a key, and the grid (T, H, W)
# -> allowed? The independent reference of the attention and rollout tests.
ALLOWED = {
    'space': lambda q, k, g: q[0] == k[0],
    'joint': lambda q, k, g: True,
    'time': lambda q, k, g: q[1:] == k[1:],
    'width': lambda q, k, g: q[:2] == k[:2],
    'height': lambda q, k, g: (q[0], q[2]) == (k[0], k[2]),
    'local': lambda q, k, g: (
        q[1] // math.ceil(g[1] / 2) == k[1] // math.ceil(g[1] / 2) and
        q[2] // math.ceil(g[2] / 2) == k[2] // math.ceil(g[2] / 2)),
    'global': lambda q, k, g: [a % 2 for a in q] == [b % 2 for b in k],
}


def reference_masks(grouping, grid, with_cls):
  """One attention step as explicit masks over a clip's patches, from
  `ALLOWED`.

  Returns `(allowed, mask, g)`: `allowed [N, N]` says which patch (in
  (t, h, w) order) attends to which. With the class token, one copy of it
  joins each set of mutually attending patches (in order of first
  appearance, so for `space` copy i is frame i): `mask [G + N, G + N]`
  over the tokens [copies; patches], with G copies; without, G = 0.
  """
  coords = list(itertools.product(*map(range, grid)))
  allowed = np.array([[ALLOWED[grouping](q, k, grid) for k in coords]
                      for q in coords])
  groups = []
  for row in allowed if with_cls else []:
    if not any((row == g).all() for g in groups):
      groups.append(row)
  g, n = len(groups), len(coords)
  mask = np.zeros((g + n, g + n), bool)
  mask[g:, g:] = allowed
  for i, members in enumerate(groups):
    mask[i, i] = True
    mask[i, g:] = members
    mask[g:, i] = members
  return allowed, mask, g


class ListSource:
  """Videos in memory as a `clip_lib.Source`; `None` stands for one that
  fails to open. Labels `[N, C]` (multi-hot) make it multi-label."""

  def __init__(self, videos, labels):
    self.videos, self.labels = videos, labels
    self.multi_label = np.ndim(labels) == 2
    if self.multi_label:
      self.num_classes = np.shape(labels)[1]

  def __len__(self):
    return len(self.videos)

  def __getitem__(self, index):
    from tsformer_jax import clip_lib  # pylint: disable=g-import-not-at-top
    if self.videos[index] is None:
      raise clip_lib.BadVideoError('unreadable')
    return self.videos[index], self.labels[index]


def write_class_folders(root, train, val):
  """The folder dataset's layout under `root`: `train` synthetic_motion
  train videos and `val` test ones as mp4s in `{train,val}/<class>/`."""
  from tsformer_jax.datasets import synthetic_motion  # pylint: disable=g-import-not-at-top
  from tsformer_jax.datasets import video_writer  # pylint: disable=g-import-not-at-top
  for split, count in (('train', train), ('val', val)):
    for i in range(count):
      frames, label = synthetic_motion.generate(
          'train' if split == 'train' else 'test', i)
      path = root / split / synthetic_motion.CLASSES[label] / f'{i}.mp4'
      path.parent.mkdir(parents=True, exist_ok=True)
      video_writer.write_mp4(str(path), frames)
  return root


def write_listing(folder, split, count):
  """`count` synthetic_motion videos of `split` as mp4s in `folder`, and
  their listing `folder/{split}.csv` (`path class`); returns its path."""
  from tsformer_jax.datasets import synthetic_motion  # pylint: disable=g-import-not-at-top
  from tsformer_jax.datasets import video_writer  # pylint: disable=g-import-not-at-top
  lines = []
  for i in range(count):
    frames, label = synthetic_motion.generate(split, i)
    video_writer.write_mp4(str(folder / f'{split}{i}.mp4'), frames)
    lines.append(f'{split}{i}.mp4 {synthetic_motion.CLASSES[label]}\n')
  (folder / f'{split}.csv').write_text(''.join(lines))
  return folder / f'{split}.csv'


def write_csv_split(root, split, good, bad_at=(), fps=None,
                    relabel=lambda label, index: label):
  """`good` synthetic_motion videos of `split` as mp4 files under
  `root/split` and their CSV `root/split.csv`, with a corrupt file at
  position `bad_at[0]` and an empty one at `bad_at[1]`. Returns the CSV's
  entries; `relabel(label, index)` gives each good video's label."""
  from tsformer_jax import video_io  # pylint: disable=g-import-not-at-top
  from tsformer_jax.datasets import kinetics  # pylint: disable=g-import-not-at-top
  from tsformer_jax.datasets import synthetic_motion  # pylint: disable=g-import-not-at-top
  from tsformer_jax.datasets import video_files  # pylint: disable=g-import-not-at-top
  from tsformer_jax.datasets import video_writer  # pylint: disable=g-import-not-at-top
  (root / split).mkdir(parents=True, exist_ok=True)
  fps = video_io.DEFAULT_FPS if fps is None else fps
  entries, videos = [], iter(range(good))
  for position in range(good + len(bad_at)):
    if position in bad_at:
      path = root / split / f'bad{position}.mp4'
      path.write_bytes(np.random.default_rng(position).bytes(3000)
                       if position == bad_at[0] else b'')
      entries.append(video_files.Entry(str(path), 0))
      continue
    index = next(videos)
    frames, label = synthetic_motion.generate(split, index)
    path = root / split / f'{index}.mp4'
    video_writer.write_mp4(str(path), frames, fps=fps)
    entries.append(video_files.Entry(str(path), relabel(label, index)))
  kinetics.write_csv(str(root / f'{split}.csv'), entries, str(root))
  return entries


def read_both_loaders(source, spec, batch_size, steps, num_workers,
                      worker_type):
  """`steps` training batches and every evaluation batch of `source`, and
  the two skip counts: `(batches, train_skipped, eval_skipped)`."""
  from tsformer_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  skipped = input_pipeline.SkipCounter()
  batches = input_pipeline.train_batches(
      source, spec, batch_size, seed=0, skipped=skipped,
      num_workers=num_workers, worker_type=worker_type)
  read = [next(batches) for _ in range(steps)]
  batches.close()
  eval_skipped = input_pipeline.SkipCounter()
  read += list(input_pipeline.eval_batches(
      source, spec, batch_size, skipped=eval_skipped,
      num_workers=num_workers, worker_type=worker_type))
  return read, len(skipped), len(eval_skipped)


# Opens a `python -c` script that must run without PyTorch: importing torch
# or transformers (the references) fails, and the script checks at its end
# that no torch module was loaded.
WITHOUT_TORCH = '''
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('torch', 'transformers'):
      raise ImportError(f'{name} is blocked in this test')

sys.meta_path.insert(0, Blocked())
'''
