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

`adapt_params` runs the steps in turn, each a function of its own: the
scheme (inflation), the position embedding, the time embedding, the head.
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
  src, dst = src_config.model, config.model
  _check_sizes(src, dst, source)
  changes = _Changes(source, allowed)
  flat = {k: np.asarray(v, np.float32) for k, v in
          flax.traverse_util.flatten_dict(params, sep='/').items()}
  flat = _fit_scheme(flat, src, dst, changes)
  flat = _fit_pos_embedding(flat, src, dst, pos_resize, changes)
  flat = _fit_time_embedding(flat, dst, changes)
  flat = _fit_head(flat, dst, rng, changes)
  if changes.refused:
    raise ValueError(f'{source} does not fit that config as it is; fitting '
                     f'it would change: {" ".join(changes.refused)} Pass '
                     '--adapt (load_checkpoint(..., fit=True)) to change '
                     'them.')
  spec.check_params(flat, config, source)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


class _Changes:
  """The changes `adapt_params` makes, each logged as it is made where
  `allowed` (None: any of `CHANGES`) admits its kind, else kept in
  `refused`."""

  def __init__(self, source: str, allowed: Collection[str] | None):
    self.source, self.allowed = source, allowed
    self.refused: list[str] = []

  def admits(self, kind: str) -> bool:
    return self.allowed is None or kind in self.allowed

  def note(self, kind: str, message: str, *args):
    if self.admits(kind):
      _LOG.info('%s: ' + message, self.source, *args)
    else:
      self.refused.append(message % args)


_SIZES = ('hidden_size', 'depth', 'num_heads', 'mlp_dim', 'patch_size')


def _check_sizes(src, dst, source: str):
  """Raises a ValueError where `src` and `dst` (`config.model`s) differ in
  what no adaptation changes: width, depth, heads, MLP, patch size."""
  if any(src[k] != dst[k] for k in _SIZES):
    raise ValueError(
        f'{source} does not fit config.model: the checkpoint has '
        f'{", ".join(f"{k}={src[k]}" for k in _SIZES)} but config.model '
        f'{", ".join(f"{k}={dst[k]}" for k in _SIZES)}.')


def _width(flat: dict[str, np.ndarray], dst) -> int:
  return flat['cls'].shape[-1] if 'cls' in flat else dst.hidden_size


def _fit_scheme(flat: dict[str, np.ndarray], src, dst, changes: _Changes
                ) -> dict[str, np.ndarray]:
  """`src.attention`'s blocks as `dst.attention`'s: unchanged where the two
  agree, inflated from a single-step scheme otherwise."""
  if src.attention == dst.attention:
    return flat
  src_scheme = attention.get_scheme(src.attention)
  dst_scheme = attention.get_scheme(dst.attention)
  if len(src_scheme.steps) != 1:
    raise ValueError(f'{changes.source}: cannot load {src.attention!r} '
                     f'weights into a {dst.attention!r} model: only '
                     'single-step weights (an image ViT, space_only or '
                     'joint) inflate into another scheme.')
  flat = _inflate(flat, src_scheme, dst_scheme, changes.source)
  changes.note('scheme', 'inflated %s into %s: steps %s start as copies of '
               'its attention, their output layers at zero.', src.attention,
               dst.attention, [s.grouping for s in dst_scheme.steps])
  if dst.attention not in IMAGE_MODEL_SCHEMES and changes.admits('scheme'):
    _LOG.warning(
        '%s: inflated into %s, the model does not start as the image '
        'model: its last step (%s attention) does not attend over exactly '
        'one frame. Only %s start as the image model.', changes.source,
        dst.attention, dst_scheme.steps[-1].grouping,
        ' and '.join(IMAGE_MODEL_SCHEMES))
  return flat


def _fit_pos_embedding(flat: dict[str, np.ndarray], src, dst,
                       pos_resize: str, changes: _Changes
                       ) -> dict[str, np.ndarray]:
  """`pos_embedding` `[1, 1 + h*w, D]` resampled to `dst`'s patch grid."""
  old, new = spec.patch_grid(src), spec.patch_grid(dst)
  pos = flat.get('pos_embedding')
  # An embedding of another length is spec.check_params' to report.
  if old == new or pos is None or pos.shape[1] != 1 + old[0] * old[1]:
    return flat
  pos = resample_pos_embedding(pos, old, new, pos_resize)
  changes.note('pos_embedding', 'resampled pos_embedding from %s to %s '
               'patches (nearest, %s).', old, new, pos_resize)
  return dict(flat, pos_embedding=pos)


def _fit_time_embedding(flat: dict[str, np.ndarray], dst, changes: _Changes
                        ) -> dict[str, np.ndarray]:
  """`time_embedding` `[1, T, D]` resampled to `dst.num_frames`, at zero
  where the checkpoint has none, dropped where `dst`'s scheme takes none."""
  flat = dict(flat)
  time = flat.pop('time_embedding', None)
  if attention.get_scheme(dst.attention).per_frame:
    if time is not None:
      changes.note('scheme', 'dropped time_embedding (%s has none).',
                   dst.attention)
    return flat
  if time is None:
    time = np.zeros((1, dst.num_frames, _width(flat, dst)), np.float32)
    changes.note('scheme', 'time_embedding starts at zero.')
  elif time.shape[1] != dst.num_frames:
    changes.note('time_embedding', 'resampled time_embedding from %d to %d '
                 'frames (nearest).', time.shape[1], dst.num_frames)
    time = resample_time_embedding(time, dst.num_frames)
  flat['time_embedding'] = time
  return flat


def _fit_head(flat: dict[str, np.ndarray], dst, rng: jax.Array | None,
              changes: _Changes) -> dict[str, np.ndarray]:
  """The head kept where it has `dst.num_classes` outputs, else drawn anew
  from `rng` (key 0 when None), or dropped for `num_classes=0`."""
  flat = dict(flat)
  kernel = flat.pop('head/kernel', None)
  bias = flat.pop('head/bias', None)
  if not dst.num_classes:
    if kernel is not None:
      changes.note('head', 'dropped the head (num_classes=0).')
    return flat
  if kernel is not None and kernel.shape[-1] == dst.num_classes:
    flat['head/kernel'], flat['head/bias'] = kernel, bias
    return flat
  rng = jax.random.key(0) if rng is None else rng
  flat['head/kernel'] = np.asarray(
      _HEAD_INIT(rng, (_width(flat, dst), dst.num_classes)), np.float32)
  flat['head/bias'] = np.zeros((dst.num_classes,), np.float32)
  changes.note('head', 'new head for %d classes (checkpoint: %s).',
               dst.num_classes,
               'no head' if kernel is None else kernel.shape[-1])
  return flat


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
