r"""Frozen-feature evaluation: a linear probe and k-NN over video features.

How video representation papers compare backbones without fine-tuning
them: one feature vector `[D]` per video, then two classifiers fitted on
the train set's vectors and scored on the test set's.

Features come from a folder that `python -m tsformer_jax.features` wrote
(`features.json` and one `<id>.npy` per video, `[windows, D]` or
`[windows, T, H', W', D]`: averaged over windows and the token grid), or
from predict's `--features_out` .npz (`video_features`), labelled by a
listing (`listing.read`). Videos without features (failed, not yet
extracted) are left out and counted.

Linear probe: logistic regression `softmax(x W + b)` (per-class sigmoids
for multi-label sets) on features standardised with the train set's mean
and standard deviation, minimising the mean cross-entropy plus
`weight_decay / 2 * |W|^2` with L-BFGS (optax, to convergence: the problem
is convex, so the result does not depend on a seed). The weight decay is
the one of `WEIGHT_DECAYS` that scores best on a held-out part of train
(`held_out_split`: a seeded, per-class fifth), ties going to the larger;
the probe is then refitted on all of train.

k-NN (Wu et al. 2018; DINO's `eval_knn`): features L2-normalised, the k
train videos of highest cosine similarity s_i to a test video vote with
weight exp(s_i / tau):

  score_c = sum over the k nearest i of exp(s_i / tau) * y_ic

where y_i is train video i's one-hot (multi-hot) label; the prediction is
the argmax. Defaults k = 20, tau = 0.07.

Single-label sets report top-1 (and top-5 with more than 5 classes);
multi-label sets (any video with other than one label) the mean average
precision over the classes with a positive in the test set (`metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsformer_jax import feature_files
from tsformer_jax import listing
from tsformer_jax import metrics

# The linear probe's weight decay grid (on standardised features).
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HELD_OUT = 0.2  # The part of train that chooses the weight decay.
MAX_STEPS = 300  # L-BFGS iterations; most fits converge well before.
_TOLERANCE = 1e-5  # Gradient norm at which a fit has converged.
_KNN_CHUNK = 512  # Test videos per similarity block: [chunk, N] floats.


@dataclasses.dataclass(frozen=True)
class FeatureSet:
  """One video per row: its features and labels.

  Attributes:
    source: the folder or .npz read.
    paths: `[N]` the videos.
    features: float32 `[N, D]`.
    labels: `[N]` class indices per video (one for a single-label set).
    classes: class names, by index.
    multi_label: whether a video may have other than one label (a folder's
      `multi_label`, or any video of the listing or folder).
    left_out: why -> count of the videos read but not kept.
  """
  source: str
  paths: list[str]
  features: np.ndarray
  labels: list[tuple[int, ...]]
  classes: list[str]
  multi_label: bool
  left_out: dict[str, int]


def load(path: str, labels_path: str | None = None,
         classes_path: str | None = None) -> FeatureSet:
  """The features of `path`, a features folder or a predict .npz.

  Args:
    path: a folder with `features.json`, or an .npz with `video_features`.
    labels_path: a listing whose labels replace the folder's (required for
      an .npz); videos are matched by path (or the folder's ids).
    classes_path: class names, one per line; by default `classes.txt`
      beside the listing, else the folder's `features.json` classes.

  Raises:
    ValueError: `path` is neither, has no labels, or is inconsistent.
  """
  is_dir = os.path.isfile(os.path.join(path, feature_files.MANIFEST))
  if not is_dir and not (path.endswith('.npz') and os.path.isfile(path)):
    raise ValueError(f'{path} is neither a features folder (with '
                     'features.json, from python -m tsformer_jax.features) '
                     'nor an .npz (from predict --features_out).')
  read = _read_folder if is_dir else _read_npz
  paths, ids, features, labels, classes, multi, left_out = read(path)
  if classes_path or labels_path:
    classes = _classes(classes_path, labels_path, classes)
  if labels_path:
    items = listing.read(labels_path, classes)
    multi = any(len(item.labels) != 1 for item in items)
    paths, features, labels = _match(paths, ids, features, items,
                                     labels_path, left_out)
  elif labels is None:
    raise ValueError(f'{path} has no labels: pass its listing '
                     '(--train_labels / --test_labels=LISTING).')
  if not paths:
    raise ValueError(f'{path}: no video has both features and labels.')
  if classes is None:
    classes = [str(c) for c in range(1 + max(max(y, default=0)
                                             for y in labels))]
  beyond = [p for p, y in zip(paths, labels, strict=True)
            if y and max(y) >= len(classes)]
  if beyond:
    raise ValueError(f'{path}: {beyond[0]} has a label beyond its '
                     f'{len(classes)} classes; pass --classes=FILE with '
                     'all of them.')
  multi = multi or any(len(y) != 1 for y in labels)
  return FeatureSet(path, paths, np.stack(features).astype(np.float32),
                    labels, list(classes), multi, left_out)


def _read_folder(path: str):
  """(paths, ids, [D] vectors, labels or None, classes or None,
  multi_label, left out) of a features folder."""
  manifest = os.path.join(path, feature_files.MANIFEST)
  with open(manifest, encoding='utf-8') as f:
    try:
      info = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{manifest} is not JSON ({e.msg}): extract again '
                       'with python -m tsformer_jax.features.') from None
  if not isinstance(info, dict) or not isinstance(info.get('videos'), list):
    raise ValueError(f'{manifest} lists no videos: extract again with '
                     'python -m tsformer_jax.features.')
  paths, ids, features, labels, left_out = [], [], [], [], {}
  for video in info['videos']:
    file = feature_files.array_path(
        path, feature_files.Entry(video['id'], video['path']))
    grid = np.load(file) if os.path.isfile(file) else None
    # [windows, D] or [windows, T, H', W', D].
    if grid is None or not grid.size or not np.isfinite(grid).all():
      why = 'no features' if grid is None else 'empty or non-finite'
      left_out[why] = left_out.get(why, 0) + 1
      continue
    paths.append(video['path'])
    ids.append(video['id'])
    features.append(grid.reshape(-1, grid.shape[-1]).mean(0, np.float64))
    labels.append(None if video['labels'] is None
                  else tuple(sorted(set(video['labels']))))
  _check_sizes(features, paths, path)
  if any(y is None for y in labels):
    labels = None
  return (paths, ids, features, labels, info.get('classes'),
          bool(info.get('multi_label')), left_out)


def _read_npz(path: str):
  """As `_read_folder`, of predict's `--features_out`: labels None."""
  try:
    npz = np.load(path)  # Never a pickle: predict writes plain arrays.
  except (OSError, ValueError, zipfile.BadZipFile):
    raise ValueError(f'{path} cannot be read as an .npz: pass one written '
                     'by predict --features_out.') from None
  with npz:
    if 'video_features' not in npz or 'paths' not in npz:
      raise ValueError(f'{path} has no video_features or paths: pass an '
                       '.npz written by predict --features_out.')
    vectors, paths = npz['video_features'], npz['paths'].tolist()
    errors = npz['errors'].tolist() if 'errors' in npz else [''] * len(paths)
  kept = [i for i, error in enumerate(errors)
          if not error and np.isfinite(vectors[i]).all()]
  left_out = ({'failed': len(paths) - len(kept)} if len(kept) < len(paths)
              else {})
  return ([paths[i] for i in kept], [None] * len(kept),
          [vectors[i] for i in kept], None, None, False, left_out)


def _check_sizes(features: Sequence[np.ndarray], paths: Sequence[str],
                 where: str):
  sizes = {f.shape[-1] for f in features}
  if len(sizes) > 1:
    odd = next(p for p, f in zip(paths, features, strict=True)
               if f.shape[-1] != features[0].shape[-1])
    raise ValueError(f'{where}: features of different sizes {sorted(sizes)}'
                     f' (e.g. {odd}); extract every video with one model.')


def _classes(classes_path: str | None, labels_path: str | None,
             found: Sequence[str] | None) -> list[str]:
  """Class names: `classes_path`, else `classes.txt` beside the listing,
  else those the features carry (`found`)."""
  beside = labels_path and os.path.join(
      os.path.dirname(os.path.abspath(labels_path)), 'classes.txt')
  if classes_path:
    return listing.read_classes(classes_path)
  if beside and os.path.isfile(beside):
    return listing.read_classes(beside)
  if found is not None:
    return list(found)
  raise ValueError(f'No class names for {labels_path}: pass --classes=FILE '
                   '(one name per line) or put classes.txt beside it.')


def _match(paths: Sequence[str], ids: Sequence[str | None],
           features: Sequence[np.ndarray], items: Sequence[listing.Item],
           labels_path: str, left_out: dict[str, int]):
  """The features of the listing's videos, with its labels; counts in
  `left_out` those on one side only.

  A video matches by absolute path (a relative one from the working
  directory, or from the listing's folder) or, for a features folder, by
  its id (its path relative to the listing's folder, extension dropped).
  """
  folder = os.path.dirname(os.path.abspath(labels_path))
  by_key = {}
  for i, (video, id_) in enumerate(zip(paths, ids, strict=True)):
    keys = [os.path.abspath(video),
            os.path.normpath(os.path.join(folder, video))]
    for key in keys + ([] if id_ is None else [('id', id_)]):
      by_key.setdefault(key, i)
  matched, kept = set(), ([], [], [])
  for item in items:
    id_ = ('id', feature_files.video_id(item.path, folder))
    i = by_key.get(os.path.normpath(item.path), by_key.get(id_))
    if i is None:
      left_out['no features'] = left_out.get('no features', 0) + 1
      continue
    matched.add(i)
    for column, value in zip(kept, (paths[i], features[i], item.labels),
                             strict=True):
      column.append(value)
  if len(matched) < len(paths):
    left_out['not in the listing'] = len(paths) - len(matched)
  return kept


def held_out_split(labels: Sequence[tuple[int, ...]], fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit, held-out) row indices of train: a seeded `fraction` of each
  class with at least two videos (by first label), so that both parts
  hold every class they can."""
  rng = np.random.default_rng(seed)
  first = np.array([y[0] if y else -1 for y in labels])
  held = []
  for c in np.unique(first):
    rows = rng.permutation(np.flatnonzero(first == c))
    if len(rows) >= 2:
      held.extend(rows[:max(1, round(fraction * len(rows)))].tolist())
  held = np.sort(np.asarray(held, np.int64))
  fit = np.setdiff1d(np.arange(len(labels)), held)
  return fit, held


def targets(labels: Sequence[tuple[int, ...]], num_classes: int
            ) -> np.ndarray:
  """float32 `[N, C]`: one-hot (multi-hot) rows."""
  return np.stack([listing.multi_hot(y, num_classes) for y in labels]
                  ).astype(np.float32)


def _loss_fn(multi_label: bool):
  def loss(params, x, y, weight_decay):
    logits = x @ params['w'] + params['b']
    if multi_label:
      data = optax.sigmoid_binary_cross_entropy(logits, y).sum(-1)
    else:
      data = optax.softmax_cross_entropy(logits, y)
    return data.mean() + 0.5 * weight_decay * jnp.sum(params['w'] ** 2)
  return loss


@functools.partial(jax.jit, static_argnames=('multi_label', 'max_steps'))
def fit_linear(x: jax.Array, y: jax.Array, weight_decay: jax.Array, *,
               multi_label: bool, max_steps: int = MAX_STEPS
               ) -> tuple[dict[str, jax.Array], jax.Array]:
  """A logistic-regression head on `x: [N, D]` for targets `y: [N, C]`.

  L-BFGS (zoom line search) from zeros until the gradient norm is below
  `_TOLERANCE` or `max_steps`. Returns ({'w': [D, C], 'b': [C]}, steps).
  """
  loss = lambda p: _loss_fn(multi_label)(p, x, y, weight_decay)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state, i = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value,
                                   grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state, i + 1

  def running(carry):
    _, state, i = carry
    grad = optax.tree_utils.tree_get(state, 'grad')
    # The state holds no gradient before the first step.
    return (i == 0) | ((i < max_steps) &
                       (optax.tree_utils.tree_norm(grad) > _TOLERANCE))

  params = dict(w=jnp.zeros((x.shape[1], y.shape[1]), jnp.float32),
                b=jnp.zeros((y.shape[1],), jnp.float32))
  params, _, steps = jax.lax.while_loop(
      running, step, (params, solver.init(params), 0))
  return params, steps


def linear_scores(train_x: np.ndarray, train_y: np.ndarray,
                  test_x: np.ndarray, weight_decay: float,
                  multi_label: bool) -> np.ndarray:
  """Probabilities `[M, C]` of a linear probe fitted on (`train_x: [N, D]`,
  `train_y: [N, C]`), on `test_x: [M, D]`; both standardised with the
  train features' mean and standard deviation."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  params, _ = fit_linear(jnp.asarray((train_x - mean) / std),
                         jnp.asarray(train_y), jnp.float32(weight_decay),
                         multi_label=multi_label)
  logits = jnp.asarray((test_x - mean) / std) @ params['w'] + params['b']
  scores = jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits)
  return np.asarray(scores)


@functools.partial(jax.jit, static_argnames=('k',))
def _knn_block(test_x: jax.Array, train_x: jax.Array, train_y: jax.Array,
               k: int, temperature: jax.Array) -> jax.Array:
  similarity = test_x @ train_x.T  # [B, N], cosines of unit vectors.
  nearest, index = jax.lax.top_k(similarity, k)  # [B, k]
  weights = jnp.exp(nearest / temperature)
  return jnp.einsum('bk,bkc->bc', weights, train_y[index])


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
               k: int = 20, temperature: float = 0.07) -> np.ndarray:
  """Weighted k-NN votes `[M, C]`: for each test row, the sum over its `k`
  train rows of highest cosine similarity s of exp(s / temperature) times
  their targets `train_y: [N, C]` (k at most N)."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True),
                                  1e-12)
  train_x, test_x = jnp.asarray(unit(train_x)), unit(test_x)
  k, rows = min(k, len(train_x)), len(test_x)
  # Fixed-size blocks (the last padded): one compilation, bounded memory.
  padded = np.pad(test_x, ((0, -rows % _KNN_CHUNK), (0, 0)))
  blocks = [_knn_block(jnp.asarray(padded[i:i + _KNN_CHUNK]), train_x,
                       jnp.asarray(train_y), k, jnp.float32(temperature))
            for i in range(0, len(padded), _KNN_CHUNK)]
  return np.concatenate([np.asarray(b) for b in blocks])[:rows]


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """The share of rows whose label `labels: [M]` is among the `k` highest
  of `scores: [M, C]` (ties: the lower class first)."""
  ranked = np.argsort(-scores, axis=-1, kind='stable')[:, :k]
  return float((ranked == labels[:, None]).any(-1).mean())


def score(scores: np.ndarray, labels: Sequence[tuple[int, ...]],
          multi_label: bool) -> dict[str, float]:
  """{'mAP': ...} for a multi-label set, else {'top1': ..., 'top5': ...}
  (top-5 with more than 5 classes)."""
  if multi_label:
    mean, per_class = metrics.mean_average_precision(
        scores, targets(labels, scores.shape[1]))
    return {'mAP': mean, 'classes_scored': int(np.isfinite(per_class).sum())}
  first = np.array([y[0] for y in labels])
  result = {'top1': top_k_accuracy(scores, first, 1)}
  if scores.shape[1] > 5:
    result['top5'] = top_k_accuracy(scores, first, 5)
  return result


def choose_weight_decay(train: FeatureSet, num_classes: int,
                        multi_label: bool, seed: int = 0,
                        grid: Sequence[float] = WEIGHT_DECAYS
                        ) -> tuple[float, dict[float, float]]:
  """The weight decay of `grid` whose probe, fitted on train less a
  held-out part, scores best on that part (ties: the larger); and each
  one's held-out score (top-1, or mAP)."""
  fit, held = held_out_split(train.labels, HELD_OUT, seed)
  if not len(held) or not len(fit):
    raise ValueError(f'{train.source}: {len(train.paths)} videos are too few '
                     'to hold some out for choosing the weight decay.')
  y = targets(train.labels, num_classes)
  held_labels = [train.labels[i] for i in held]
  key = 'mAP' if multi_label else 'top1'
  results = {}
  for weight_decay in grid:
    scores = linear_scores(train.features[fit], y[fit],
                           train.features[held], weight_decay, multi_label)
    results[weight_decay] = score(scores, held_labels, multi_label)[key]
  best = max(grid, key=lambda wd: (np.nan_to_num(results[wd], nan=-1), wd))
  return best, results


def check_pair(train: FeatureSet, test: FeatureSet):
  """Raises a ValueError where `train` and `test` cannot be compared."""
  if train.features.shape[1] != test.features.shape[1]:
    raise ValueError(f'Train features ({train.source}) have '
                     f'{train.features.shape[1]} dimensions and test '
                     f'({test.source}) {test.features.shape[1]}: extract '
                     'both with the same model and --layer.')
  # Indices stand in for names where neither set has any (`load`).
  unnamed = all(c.isdigit() for c in train.classes + test.classes)
  if train.classes != test.classes and not unnamed:
    raise ValueError(f'{train.source} and {test.source} name different '
                     'classes: pass one --classes=FILE for both.')
  present = {c for y in train.labels for c in y}
  if len(present) < 2:
    raise ValueError(f'{train.source}: its {len(train.paths)} videos have '
                     f'{len(present)} class(es); a probe needs two or more '
                     'in train.')


def evaluate(train: FeatureSet, test: FeatureSet, *, k: int = 20,
             temperature: float = 0.07, seed: int = 0) -> dict:
  """Linear-probe and k-NN scores of `test`, fitted on `train`.

  Returns:
    A JSON-ready dict: `multi_label`, `num_classes`, `n_train`, `n_test`,
    `left_out` (per set), `linear` (its scores, `weight_decay` and
    `held_out`: the score of each weight decay tried) and `knn` (its
    scores, `k`, `temperature`).
  """
  check_pair(train, test)
  num_classes = max(len(train.classes), len(test.classes))
  multi_label = train.multi_label or test.multi_label
  if multi_label and not any(test.labels):
    raise ValueError(f'{test.source}: no test video has a label, so no '
                     'class can be scored (mAP).')
  weight_decay, held_out = choose_weight_decay(train, num_classes,
                                               multi_label, seed)
  y = targets(train.labels, num_classes)
  linear = linear_scores(train.features, y, test.features, weight_decay,
                         multi_label)
  knn = knn_scores(train.features, y, test.features, k, temperature)
  return dict(
      multi_label=multi_label, num_classes=num_classes,
      n_train=len(train.paths), n_test=len(test.paths),
      left_out=dict(train=train.left_out, test=test.left_out),
      linear=dict(score(linear, test.labels, multi_label),
                  weight_decay=weight_decay,
                  held_out={str(wd): _or_none(v)
                            for wd, v in held_out.items()}),
      knn=dict(score(knn, test.labels, multi_label), k=min(k, len(y)),
               temperature=temperature))


def _or_none(value: float) -> float | None:
  # JSON has no NaN: a held-out part without positives scores None.
  return None if np.isnan(value) else value


def table(result: dict) -> str:
  """The scores as a text table: method, metric, value, n_train, n_test."""
  lines = [f'{"method":<8}{"metric":<8}{"value":>8}{"n_train":>9}'
           f'{"n_test":>8}']
  for method in ('linear', 'knn'):
    for metric in ('top1', 'top5', 'mAP'):
      if metric in result[method]:
        lines.append(f'{method:<8}{metric:<8}{result[method][metric]:>8.4f}'
                     f'{result["n_train"]:>9}{result["n_test"]:>8}')
  return '\n'.join(lines)
