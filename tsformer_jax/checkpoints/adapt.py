"""Fits weights to another config: frames, frame size, classes, scheme.

Embeddings are resampled with nearest neighbours, as the original does. A
single-step scheme (ViT, `space_only`, `joint`) inflates into any other: each
attention step starts as a copy of the image attention and every step's
output layer (`fc`) at zero. Image weights so inflated start as the image
model in `IMAGE_MODEL_SCHEMES` only: `space_only` (frame by frame) and
`divided` (on a still clip). The last step of `joint` (the whole clip),
`axial` (a column) and `sparse_local_global` (every second patch) does not
attend over exactly one frame, so these start near the image model, not at
it, and a warning says so. The original inflates into divided attention
only.
"""

from __future__ import annotations

from collections.abc import Collection
import logging

import flax
import flax.linen as nn
import jax
import numpy as np

from tsformer_jax import attention
from tsformer_jax.checkpoints import spec

_LOG = logging.getLogger(__name__)

POS_RESIZE_MODES = ('2d', '1d')
# The schemes that image weights, inflated, start as the image model in.
IMAGE_MODEL_SCHEMES = ('divided', 'space_only')
_HEAD_INIT = nn.initializers.normal(stddev=0.02)  # The model's.


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output index, as torch's `mode='nearest'`.

  `floor(i * in_size / out_size)` in float32, like PyTorch's (and the
  original TimeSformer's) `F.interpolate(..., mode='nearest')`.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  index = np.floor(np.arange(out_size, dtype=np.float32) * scale)
  return np.minimum(index.astype(np.int64), in_size - 1)


def resample_pos_embedding(pos: np.ndarray, old_grid: tuple[int, int],
                           new_grid: tuple[int, int],
                           mode: str = '2d') -> np.ndarray:
  """`[1, 1 + h*w, D]` -> `[1, 1 + h'*w', D]`; the class entry is kept.

  `mode` '2d' resizes the patch grid (as the original does for a new frame
  size at inference); '1d' the flattened sequence (as the original does when
  loading ImageNet weights), which scrambles rows when the grid changes but
  reproduces the original exactly.
  """
  if mode not in POS_RESIZE_MODES:
    raise ValueError(f'Unknown position embedding resize {mode!r}; valid: '
                     f'{list(POS_RESIZE_MODES)}.')
  (h, w), (nh, nw) = old_grid, new_grid
  if pos.ndim != 3 or pos.shape[:2] != (1, 1 + h * w):
    raise ValueError(f'Position embedding of shape {list(pos.shape)} does '
                     f'not fit a {h} x {w} patch grid: expected '
                     f'[1, {1 + h * w}, D].')
  cls, patches = pos[:, :1], pos[:, 1:]
  if mode == '1d':
    patches = patches[:, nearest_indices(h * w, nh * nw)]
  else:
    grid = patches.reshape(1, h, w, -1)
    grid = grid[:, nearest_indices(h, nh)][:, :, nearest_indices(w, nw)]
    patches = grid.reshape(1, nh * nw, -1)
  return np.concatenate([cls, patches], axis=1)


def resample_time_embedding(time: np.ndarray, num_frames: int) -> np.ndarray:
  """`[1, T, D]` -> `[1, num_frames, D]`, nearest along time."""
  return time[:, nearest_indices(time.shape[1], num_frames)]


# The kinds of change `adapt_params` makes.
CHANGES = ('scheme', 'pos_embedding', 'time_embedding', 'head')


def adapt_params(params, src_config, config, *, rng: jax.Array | None = None,
                 pos_resize: str = '2d', source: str = 'checkpoint',
                 allowed: Collection[str] | None = None) -> dict:
  """Fits `params` of `src_config` to `config`, logging every change.

  Width, depth, heads, MLP and patch size must agree; frames, frame size,
  class count and (from a single-step scheme) the scheme may differ. `rng`
  draws a new head (key 0 when None), `source` names the checkpoint in logs
  and errors. `allowed` limits the changes to these of `CHANGES` (None: any);
  a change beyond them is a ValueError naming every change needed. Returns
  float32 numpy params for `create_model(config)`.
  """
  changes = []

  def note(kind, message, *args):
    changes.append((kind, message % args))
    if allowed is None or kind in allowed:
      _LOG.info('%s: ' + message, source, *args)

  src, dst = src_config.model, config.model
  sizes = ('hidden_size', 'depth', 'num_heads', 'mlp_dim', 'patch_size')
  if any(src[k] != dst[k] for k in sizes):
    raise ValueError(
        f'{source} does not fit config.model: the checkpoint has '
        f'{", ".join(f"{k}={src[k]}" for k in sizes)} but config.model '
        f'{", ".join(f"{k}={dst[k]}" for k in sizes)}.')
  src_scheme = attention.get_scheme(src.attention)
  dst_scheme = attention.get_scheme(dst.attention)
  flat = {k: np.asarray(v, np.float32) for k, v in
          flax.traverse_util.flatten_dict(params, sep='/').items()}
  same = src.attention == dst.attention
  if not same and len(src_scheme.steps) != 1:
    raise ValueError(f'{source}: cannot load {src.attention!r} weights into '
                     f'a {dst.attention!r} model: only single-step weights '
                     '(an image ViT, space_only or joint) inflate into '
                     'another scheme.')
  if not same:
    flat = _inflate(flat, src_scheme, dst_scheme, source)
    note('scheme', 'inflated %s into %s: steps %s start as copies of its '
         'attention, their output layers at zero.', src.attention,
         dst.attention, [s.grouping for s in dst_scheme.steps])
    if dst.attention not in IMAGE_MODEL_SCHEMES and (
        allowed is None or 'scheme' in allowed):
      _LOG.warning(
          '%s: inflated into %s, the model does not start as the image '
          'model: its last step (%s attention) does not attend over exactly '
          'one frame. Only %s start as the image model.', source,
          dst.attention, dst_scheme.steps[-1].grouping,
          ' and '.join(IMAGE_MODEL_SCHEMES))

  old, new = spec.patch_grid(src), spec.patch_grid(dst)
  pos = flat.get('pos_embedding')
  if old != new and pos is not None and pos.shape[1] == 1 + old[0] * old[1]:
    flat['pos_embedding'] = resample_pos_embedding(pos, old, new, pos_resize)
    note('pos_embedding', 'resampled pos_embedding from %s to %s patches '
         '(nearest, %s).', old, new, pos_resize)

  time = flat.pop('time_embedding', None)
  if not dst_scheme.per_frame:
    if time is None:
      width = flat['cls'].shape[-1] if 'cls' in flat else dst.hidden_size
      time = np.zeros((1, dst.num_frames, width), np.float32)
      note('scheme', 'time_embedding starts at zero.')
    elif time.shape[1] != dst.num_frames:
      note('time_embedding', 'resampled time_embedding from %d to %d frames '
           '(nearest).', time.shape[1], dst.num_frames)
      time = resample_time_embedding(time, dst.num_frames)
    flat['time_embedding'] = time
  elif time is not None:
    note('scheme', 'dropped time_embedding (%s has none).', dst.attention)

  kernel = flat.pop('head/kernel', None)
  bias = flat.pop('head/bias', None)
  if dst.num_classes:
    if kernel is not None and kernel.shape[-1] == dst.num_classes:
      flat['head/kernel'], flat['head/bias'] = kernel, bias
    else:
      width = flat['cls'].shape[-1] if 'cls' in flat else dst.hidden_size
      rng = jax.random.key(0) if rng is None else rng
      flat['head/kernel'] = np.asarray(
          _HEAD_INIT(rng, (width, dst.num_classes)), np.float32)
      flat['head/bias'] = np.zeros((dst.num_classes,), np.float32)
      note('head', 'new head for %d classes (checkpoint: %s).',
           dst.num_classes, 'no head' if kernel is None else kernel.shape[-1])
  elif kernel is not None:
    note('head', 'dropped the head (num_classes=0).')

  refused = [m for kind, m in changes
             if allowed is not None and kind not in allowed]
  if refused:
    raise ValueError(f'{source} does not fit that config as it is; fitting '
                     f'it would change: {" ".join(refused)} Pass --adapt '
                     '(load_checkpoint(..., fit=True)) to change them.')

  spec.check_params(flat, config, source)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _inflate(flat: dict[str, np.ndarray], src_scheme: attention.Scheme,
             dst_scheme: attention.Scheme, source: str
             ) -> dict[str, np.ndarray]:
  """A single-step scheme's blocks into `dst_scheme`'s steps."""
  src_step = f'{src_scheme.steps[0].grouping}_attention'
  out, blocks = {}, set()
  for path, value in flat.items():
    parts = path.split('/')
    if not (parts[0].startswith('block_') and parts[1] == src_step):
      out[path] = value
      continue
    blocks.add(parts[0])
    for step in dst_scheme.steps:
      out['/'.join([parts[0], f'{step.grouping}_attention'] + parts[2:])] = (
          value)
  for block in blocks:
    width = flat[f'{block}/{src_step}/proj/bias'].shape[-1]
    for step in dst_scheme.steps:
      if step.output_fc:  # Zero, so that the copied step adds nothing.
        fc = f'{block}/{step.grouping}_attention/fc'
        out[f'{fc}/kernel'] = np.zeros((width, width), np.float32)
        out[f'{fc}/bias'] = np.zeros((width,), np.float32)
  for step in dst_scheme.steps[:-1]:
    if not step.output_fc:
      _LOG.warning('%s: step %s has no output layer to zero; the '
                   'inflated model differs from the image model.', source,
                   step.grouping)
  return out
