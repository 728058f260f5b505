"""Training losses, their targets, and mixup; the head's probabilities.

`config.model.loss` picks one of two heads:
- 'softmax' (the paper's): one class per video; cross-entropy against
  (smoothed) one-hot targets; scores are softmax probabilities.
- 'sigmoid' (multi-label: Charades, HVU, ...): each class is its own yes/no
  question; binary cross-entropy on every class's logit, averaged over
  classes and videos as PySlowFast's Charades recipe does
  (`BCEWithLogitsLoss(reduction='mean')`); scores are sigmoid
  probabilities.

Labels arrive as int32 `[B]` (one class per video) or as multi-hot uint8
`[B, C]`; `targets` turns either into float `[B, C]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSSES = ('softmax', 'sigmoid')


def loss_name(config) -> str:
  """`config.model.loss`, checked."""
  name = config.model.loss
  if name not in LOSSES:
    raise ValueError(f'Unknown model.loss {name!r}; valid: {list(LOSSES)}.')
  return name


def check_labels(name: str, labels: jax.Array):
  """Refuses multi-hot labels `[B, C]` for the softmax loss, which would
  train on one class of each video (a static check: shapes only)."""
  if name == 'softmax' and labels.ndim == 2:
    raise ValueError(
        'The data is multi-label (labels [B, C]) but config.model.loss is '
        "'softmax': set --config.model.loss=sigmoid.")


def targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
            ) -> jax.Array:
  """Float targets `[B, C]` from int labels `[B]` (one-hot) or multi-hot
  labels `[B, C]`, smoothed as `y (1 - s) + s / C` for both losses (as
  optax's `smooth_labels`; for the sigmoid loss as timm's BinaryCrossEntropy
  and PySlowFast's `mixup_target`: each positive becomes 1 - s + s / C, each
  negative s / C)."""
  if labels.ndim == 1:
    hot = jax.nn.one_hot(labels, num_classes)
  else:
    hot = labels.astype(jnp.float32)
  return optax.smooth_labels(hot, label_smoothing)


def loss(name: str, logits: jax.Array, soft: jax.Array) -> jax.Array:
  """The mean loss of `logits [B, C]` against float targets `[B, C]`:
  cross-entropy per video ('softmax'), or binary cross-entropy per video and
  class ('sigmoid')."""
  if name == 'softmax':
    return optax.softmax_cross_entropy(logits, soft).mean()
  if name == 'sigmoid':
    return optax.sigmoid_binary_cross_entropy(logits, soft).mean()
  raise ValueError(f'Unknown loss {name!r}; valid: {list(LOSSES)}.')


def probabilities(name: str, logits: jax.Array) -> jax.Array:
  """The head's probabilities `[..., C]`: softmax (they sum to one) or
  sigmoid (one per class)."""
  if name == 'sigmoid':
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits)


def top1_hits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """bool `[B]`: the top-scoring class is one of the video's labels (for
  int labels `[B]`, top-1 accuracy; for multi-hot `[B, C]`, precision at
  one)."""
  best = jnp.argmax(logits, -1)
  if labels.ndim == 1:
    return best == labels
  return jnp.take_along_axis(labels, best[:, None], 1)[:, 0] > 0


def mixup(rng: jax.Array, clips: jax.Array, soft: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
  """Mixup (Zhang et al. 2018) with the batch reversed as partner: clips
  and targets (one-hot or multi-hot) mix with the same weight."""
  lam = jax.random.beta(rng, alpha, alpha)
  mix = lambda x: lam * x + (1.0 - lam) * x[::-1]
  return mix(clips), mix(soft)
