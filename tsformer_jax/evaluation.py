"""Evaluation: the eval step, its metrics, and models run over whole videos.

`evaluate` measures top-1 / top-5 and the loss over a dataset split with
multi-view testing: `eval_step` scores a batch of videos, each cut into
`config.data.test_num_clips` x `test_num_crops` views, whose scores
combine as `config.data.test_view_scores` says (`combine_views`); with
`config.data.test_clip_stride` set, it takes the paper's long-video
protocol instead (`evaluate_long_videos`). Both paths end in `summarize`.
A sigmoid head (`config.model.loss='sigmoid'`) averages the views' sigmoid
probabilities; on multi-label data (labels `[B, C]`) it reports the mean
average precision over the whole split (`metrics.mean_average_precision`).

`predict_videos` classifies videos (files or arrays) and extracts their
features: it cuts each into the views a `long_video.Coverage` names
(evaluation's own views by default), runs them through one compiled
forward pass in fixed-size batches shared across videos, and combines the
views' scores and averages their features per video. The long-video
protocol and `python -m tsformer_jax.predict` both call it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from tsformer_jax import clip_lib
from tsformer_jax import datasets
from tsformer_jax import input_pipeline
from tsformer_jax import long_video
from tsformer_jax import losses
from tsformer_jax import metrics
from tsformer_jax import model as model_lib
from tsformer_jax import sharding
from tsformer_jax import video_io

# forward(params, clips [B, T, H, W, 3] of pixel values, uint8 or float32)
# -> {'logits': [B, C], 'scores': [B, C] their softmax (sigmoid for a
# sigmoid head), 'features': [B, D]};
# 'logits' and 'scores' come together or not at all (no head).
Forward = Callable[[dict, np.ndarray], dict[str, np.ndarray]]

# How a video's views combine into its scores (`config.data.test_view_scores`):
# 'logit_sum' as the original's test meter, which sums the views' logits and
# ranks the sums; 'softmax_mean' averages the views' softmax probabilities.
VIEW_SCORES = ('logit_sum', 'softmax_mean')


def view_scores(config) -> str:
  """`config.data.test_view_scores`, checked."""
  method = config.data.test_view_scores
  if method not in VIEW_SCORES:
    raise ValueError(f'Unknown data.test_view_scores {method!r}; valid: '
                     f'{list(VIEW_SCORES)}.')
  return method


def combine_views(logits: jax.Array, method: str, loss: str = 'softmax'
                  ) -> tuple[jax.Array, jax.Array]:
  """One video's scores from its views' logits `[..., V, C]`.

  Returns:
    `ranking [..., C]`, the scores that rank the classes, and `probs
    [..., C]`, probabilities for the loss and for display. 'logit_sum': the
    logits summed over the views, and the softmax of their mean (which
    ranks alike). 'softmax_mean': the views' softmaxes averaged, both times.
    A sigmoid head (`loss='sigmoid'`): the views' sigmoid probabilities
    averaged, both times, whatever `method` says (what a threshold reads).
  """
  if loss == 'sigmoid':
    probs = jax.nn.sigmoid(logits).mean(-2)
    return probs, probs
  if method == 'logit_sum':
    return logits.sum(-2), jax.nn.softmax(logits.mean(-2))
  if method == 'softmax_mean':
    probs = jax.nn.softmax(logits).mean(-2)
    return probs, probs
  raise ValueError(f'Unknown view scores {method!r}; valid: '
                   f'{list(VIEW_SCORES)}.')


def eval_step(params, batch: dict[str, jax.Array], *, apply_fn: Callable,
              mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225),
              channel_order: str = 'rgb', view_scores: str = 'logit_sum',
              loss: str = 'softmax') -> dict[str, jax.Array]:
  """Multi-view scores: each video's views combined as `view_scores` says.

  Args:
    params: model parameters.
    batch: `clips [B, V, T, H, W, 3]` (V views per video; pixel values,
      uint8 or float32, normalised here with `mean` / `std`),
      `labels`, int `[B]` or multi-hot `[B, C]`, `mask [B]` (False for
      padding).
    apply_fn: the model's apply.
    mean: per-channel mean (`config.data.mean`).
    std: per-channel standard deviation (`config.data.std`).
    channel_order: the model's (`config.data.channel_order`): clips are
      RGB, reversed for 'bgr'.
    view_scores: `config.data.test_view_scores`: 'logit_sum' ranks the
      classes by the views' summed logits (the original's), 'softmax_mean'
      by their averaged softmaxes (`combine_views`).
    loss: `config.model.loss`; 'sigmoid' scores and measures as
      `sigmoid_metrics` does.

  Returns:
    Sums over the batch: `count`, `top1`, `top5` (correct videos) and
    `loss` (cross-entropy of the video's probabilities: the softmax of the
    mean logits, or the mean softmax); for a sigmoid head `sigmoid_metrics`.
  """
  losses.check_labels(loss, batch['labels'])
  b, v = batch['clips'].shape[:2]
  clips = clip_lib.device_normalize(batch['clips'], mean, std, channel_order)
  logits = apply_fn({'params': params},
                    clips.reshape((b * v,) + clips.shape[2:]))
  scores, probs = combine_views(
      logits.astype(jnp.float32).reshape(b, v, -1), view_scores,
      loss)  # [B, C]
  if loss == 'sigmoid':
    return sigmoid_metrics(probs, batch['labels'], batch['mask'])
  return video_metrics(scores, batch['labels'], batch['mask'], probs)


def video_metrics(scores: jax.Array, labels: jax.Array, mask: jax.Array,
                  probs: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums of top-1 / top-5 hits and of the loss over unmasked videos.

  `scores [B, C]` rank the classes; the loss is the label's negative
  log-probability in `probs [B, C]` (`scores` where None). A class scoring
  as high as the label's ranks before it, and a video with a NaN score is
  never a hit: uniform or NaN scores give no accuracy.
  """
  label_scores = jnp.take_along_axis(scores, labels[:, None], 1)  # [B, 1]
  rank = jnp.sum(scores >= label_scores, -1) - 1
  mask = mask.astype(jnp.float32)
  valid = jnp.all(jnp.isfinite(scores), -1)
  hits = lambda k: jnp.sum(((rank < k) & valid) * mask)
  probs = scores if probs is None else probs
  nll = -jnp.log(jnp.take_along_axis(probs, labels[:, None], 1)[:, 0] + 1e-9)
  return dict(count=mask.sum(), top1=hits(1), top5=hits(5),
              loss=jnp.sum(nll * mask))


# Multi-label `sigmoid_metrics` rows: AP needs them whole (no sums).
ROWS = ('scores', 'labels', 'mask')


def sigmoid_metrics(probs: jax.Array, labels: jax.Array, mask: jax.Array
                    ) -> dict[str, jax.Array]:
  """A sigmoid head's metrics of videos scored `probs [B, C]` (their views'
  mean sigmoid probabilities).

  Returns:
    Sums over unmasked videos: `count`, `loss` (binary cross-entropy of
    `probs`, averaged over classes as the training loss) and `top1`; for
    int labels `[B]` also `top5`, as `video_metrics`. For multi-hot labels
    `[B, C]`, `top1` counts videos whose best class is one of theirs, and
    the rows `scores`, `labels` and `mask` come back for the mAP.
  """
  targets = losses.targets(labels, probs.shape[-1])
  p = jnp.clip(probs, 1e-7, 1 - 1e-7)
  bce = -(targets * jnp.log(p) + (1 - targets) * jnp.log1p(-p)).mean(-1)
  weights = mask.astype(jnp.float32)
  if labels.ndim == 1:
    return dict(video_metrics(probs, labels, mask),
                loss=jnp.sum(bce * weights))
  return dict(count=weights.sum(), loss=jnp.sum(bce * weights),
              top1=jnp.sum(losses.top1_hits(probs, labels) * weights),
              scores=probs, labels=labels, mask=mask)


def summarize(sums: dict[str, jax.Array] | None,
              rows: Sequence[dict[str, jax.Array]] = (),
              class_names: Sequence[str] = ()) -> dict:
  """The per-video means of `video_metrics` sums: `top1`, `top5`, `loss`,
  and `videos`, their count. Every evaluation ends here.

  With `rows`, the outputs of `sigmoid_metrics` on multi-label batches,
  `top5` gives way to `map`, the mean AP over all their unmasked videos of
  the classes with a positive among them (the Charades protocol),
  `classes_excluded`, those without, and `per_class_ap`, {class name
  (`class_names`, else the index): AP, or None where excluded}.

  Raises:
    clip_lib.BadVideoError: no video was counted (`sums` None or empty).
  """
  count = 0.0 if sums is None else float(sums['count'])
  if not count:
    raise clip_lib.BadVideoError('No evaluation video could be read.')
  means = {k: float(sums[k]) / count for k in ('top1', 'top5', 'loss')
           if k in sums}
  if not rows:
    return dict(means, videos=count)
  rows = jax.device_get([{k: r[k] for k in ROWS} for r in rows])
  keep = np.concatenate([r['mask'] for r in rows]).astype(bool)
  mean_ap, per_class = metrics.mean_average_precision(
      *(np.concatenate([r[k] for r in rows])[keep]
        for k in ('scores', 'labels')))
  if len(class_names) != len(per_class):
    class_names = [str(c) for c in range(len(per_class))]
  return dict(means, videos=count, map=mean_ap,
              classes_excluded=int(np.isnan(per_class).sum()),
              per_class_ap={name: None if np.isnan(ap) else float(ap)
                            for name, ap in zip(class_names, per_class,
                                                strict=True)})


def jit_eval_step(config, params, apply_fn: Callable,
                  mesh: jax.sharding.Mesh) -> Callable:
  """`eval_step` jitted for `params` laid out as on `mesh`."""
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  num_views = clip_lib.clip_spec(config).num_views
  step = functools.partial(eval_step, apply_fn=apply_fn,
                           mean=tuple(config.data.mean),
                           std=tuple(config.data.std),
                           channel_order=config.data.channel_order,
                           view_scores=view_scores(config),
                           loss=losses.loss_name(config))
  return jax.jit(step,
                 in_shardings=(sharding.state_shardings(params, mesh, config),
                               sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh),
                 # Per device: every view of each video in the batch.
                 compiler_options=model_lib.inference_compiler_options(
                     config, config.eval_batch_size * num_views // mesh.size))


def evaluate(config, params, apply_fn: Callable,
             source: clip_lib.Source,
             skipped: input_pipeline.SkipCounter,
             step: Callable | None = None,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Top-1 / top-5 (multi-label: mAP) and the loss over the videos of
  `source` (`summarize`).

  Multi-view testing in batches of `config.eval_batch_size` videos; the
  long-video protocol (`evaluate_long_videos`) where
  `config.data.test_clip_stride` is set. `step` is `eval_step` compiled for
  `params` (`jit_eval_step`); compiled here when None. With a `mesh`, every
  process reads its share of each batch, which is then split over the
  mesh's devices. Videos that fail to load are counted in `skipped`.
  """
  if config.data.test_clip_stride > 0:
    return evaluate_long_videos(config, params, source, skipped)
  if mesh is None:
    mesh = sharding.create_mesh(config)
  if step is None:
    step = jit_eval_step(config, params, apply_fn, mesh)
  batches = sharding.batch_sharding(mesh)
  loaded = input_pipeline.eval_batches(
      source, clip_lib.clip_spec(config), config.eval_batch_size,
      config.data.num_workers, skipped, process_index=jax.process_index(),
      process_count=jax.process_count(),
      worker_type=config.data.worker_type)
  totals, rows = None, []
  for batch in input_pipeline.prefetch_to_device(
      loaded, lambda b: sharding.global_batch(b, batches)):
    outputs = step(params, batch)
    # Replicated: every process holds all the hosts' rows.
    if 'scores' in outputs:
      rows.append(outputs)
    sums = {k: v for k, v in outputs.items() if k not in ROWS}
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return summarize(totals, rows, config.data.class_names)


def long_video_coverage(config) -> long_video.Coverage:
  """The clips of the long-video protocol (`config.data.test_clip_stride`
  seconds apart), checked against the rest of the config.

  Raises:
    ValueError: several processes, or a sampling that takes no stride.
  """
  if jax.process_count() > 1:
    raise ValueError('Long-video evaluation (data.test_clip_stride > 0) '
                     'runs in one process; run --mode=eval without '
                     '--num_processes.')
  coverage = long_video.Coverage(stride_seconds=config.data.test_clip_stride,
                                 num_crops=config.data.test_num_crops)
  long_video.check_coverage(clip_lib.clip_spec(config), coverage)
  return coverage


def evaluate_long_videos(config, params, source: clip_lib.Source,
                         skipped: input_pipeline.SkipCounter
                         ) -> dict[str, float]:
  """The long-video protocol (HowTo100M in the paper): every video is
  covered from start to end by clips every `config.data.test_clip_stride`
  seconds (x `test_num_crops` crops), whose scores combine as
  `config.data.test_view_scores` says (as the views of `eval_step`).

  Videos hold different numbers of clips, so this runs the clips of all
  videos through `predict_videos` in one process. A sigmoid head averages
  the clips' sigmoid probabilities (`combine_views`).
  """
  coverage = long_video_coverage(config)
  videos, labels, indices = [], [], []
  for index in range(len(source)):
    try:
      video, label = source[index]
    except Exception as e:  # pylint: disable=broad-except
      skipped.add(index, e)  # As the batched pipeline: count, go on.
      continue
    videos.append(video)
    labels.append(label)
    indices.append(index)
  predictions = predict_videos(config, params, videos, coverage=coverage)
  # 'logit_sum' ranks by the mean logits: as their sum, whatever the count.
  by_logits = view_scores(config) == 'logit_sum'
  scores, probs, good = [], [], []
  for index, label, prediction in zip(indices, labels, predictions,
                                      strict=True):
    if prediction.error is not None:
      skipped.add(index, clip_lib.BadVideoError(prediction.error))
    else:
      scores.append(prediction.logits if by_logits else prediction.scores)
      probs.append(prediction.scores)
      good.append(label)
  if not good:
    return summarize(None)
  scores, probs, good = (jnp.asarray(np.stack(x)) for x in (scores, probs,
                                                            good))
  everyone = jnp.ones(len(good), bool)
  if losses.loss_name(config) == 'softmax':
    return summarize(video_metrics(scores, good, everyone, probs))
  outputs = sigmoid_metrics(probs, good, everyone)
  return summarize(outputs, [outputs] if 'scores' in outputs else [],
                   config.data.class_names)


@dataclasses.dataclass
class Prediction:
  """What the model says about one video.

  Views are the video's clips times crops, clip-major. Per-view arrays
  hold the views of a video that was read; they are empty where it failed.

  Attributes:
    path: the video file (`video {i}` for a video given in memory).
    error: why the video could not be read; None if it was.
    scores: float32 `[C]`, class probabilities from the views, as
      `config.data.test_view_scores` combines them (`combine_views`):
      the softmax of the views' mean logits ('logit_sum'), or the views'
      softmaxes averaged ('softmax_mean'); for a sigmoid head the views'
      sigmoid probabilities averaged. None where the video failed or the
      model has no head.
    logits: float32 `[C]` or None, the views' logits averaged (their sum,
      the original's test scores, over V).
    features: float32 `[D]`, class-token features averaged over the views;
      None unless asked for, or where the video failed.
    clip: int32 `[V]`, the clip of each view, in time order.
    crop: int32 `[V]`, its crop.
    start: int64 `[V]`, its clip's first frame.
    view_scores: float32 `[V, C]` or None, each view's softmax (sigmoid).
    view_logits: float32 `[V, C]` or None, each view's logits.
    view_features: float32 `[V, D]` or None, as `features`.
  """
  path: str
  error: str | None = None
  scores: np.ndarray | None = None
  logits: np.ndarray | None = None
  features: np.ndarray | None = None
  clip: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int32))
  crop: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int32))
  start: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int64))
  view_scores: np.ndarray | None = None
  view_logits: np.ndarray | None = None
  view_features: np.ndarray | None = None

  def top_k(self, k: int) -> list[tuple[int, float]]:
    """The `k` best classes, best first: `(class, probability)` pairs
    (fewer where there are fewer classes)."""
    if self.scores is None:
      return []
    order = np.argsort(-self.scores, kind='stable')[:k]
    return [(int(i), float(self.scores[i])) for i in order]

  def above(self, threshold: float) -> list[tuple[int, float]]:
    """`(class, probability)` pairs, best first, of the classes whose
    probability is at least `threshold` (a sigmoid head's labels)."""
    if self.scores is None:
      return []
    order = np.argsort(-self.scores, kind='stable')
    return [(int(i), float(self.scores[i])) for i in order
            if self.scores[i] >= threshold]


def _is_final_norm(module, method_name: str) -> bool:
  # The model's last LayerNorm ('norm' at the top level): its output is the
  # class-token features that the head maps to logits.
  return method_name == '__call__' and module.path == ('norm',)


def forward_fn(config, with_features: bool = False) -> Forward:
  """The model's inference forward as a `Forward` (not yet jitted).

  It takes RGB pixel values (uint8, or float32 from the original's resize)
  and normalises them with `config.data.mean` / `std` in
  `config.data.channel_order`, as the train and eval steps do.
  With `with_features`, one pass gives both the scores and the features the
  head reads (the same as `model.apply` with `num_classes = 0`). A model
  without a head (`num_classes = 0`) gives its features only.
  """
  model = model_lib.create_model(config)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  channel_order = config.data.channel_order
  probabilities = functools.partial(losses.probabilities,
                                    losses.loss_name(config))

  def forward(params, clips):
    clips = clip_lib.device_normalize(clips, mean, std, channel_order)
    variables = {'params': params}
    if not config.model.num_classes:
      return dict(features=model.apply(variables, clips))
    if not with_features:
      logits = model.apply(variables, clips).astype(jnp.float32)
      return dict(logits=logits, scores=probabilities(logits))
    logits, state = model.apply(variables, clips,
                                capture_intermediates=_is_final_norm,
                                mutable=['intermediates'])
    features = state['intermediates']['norm']['__call__'][0]
    logits = logits.astype(jnp.float32)
    return dict(logits=logits, scores=probabilities(logits),
                features=features.astype(jnp.float32))

  return forward


def predict_videos(config, params, videos: Sequence[str | clip_lib.Video],
                   *, coverage: long_video.Coverage | None = None,
                   batch_size: int | None = None, with_features: bool = False,
                   forward: Forward | None = None) -> list[Prediction]:
  """Scores (and features) of each video, from its views.

  Args:
    config: the model's config (`load_checkpoint` returns it); its
      `config.data` says how clips are sampled and normalised, and how
      views' scores combine (`test_view_scores`).
    params: the model's parameters.
    videos: file paths, or `clip_lib.Video`s.
    coverage: which clips and crops; None takes evaluation's views.
    batch_size: views per forward pass; None takes
      `config.eval_batch_size`.
    with_features: also return the class-token features.
    forward: replaces the model's jitted `forward_fn(config,
      with_features)`, e.g. by a fake model in tests; it receives clips
      `[B, T, H, W, 3]` of `clip_lib.clip_dtype`.

  Returns:
    One `Prediction` per video, in order; a video that could not be read
    has its `error` set and the others are unaffected.
  """
  spec = clip_lib.clip_spec(config)
  method = view_scores(config), losses.loss_name(config)
  coverage = coverage or long_video.Coverage.evaluation(spec)
  batch_size = batch_size or config.eval_batch_size
  if forward is None:
    forward = jax.jit(
        forward_fn(config, with_features),
        compiler_options=model_lib.inference_compiler_options(config,
                                                             batch_size))
    params = jax.device_put(params)  # Once, not with every batch.
  videos = [video_io.VideoFile(os.fspath(v))
            if isinstance(v, (str, os.PathLike)) else v for v in videos]
  errors: dict[int, str] = {}
  parts: dict[str, list[np.ndarray]] = {}
  pending = None
  for batch in long_video.clip_batches(videos, spec, coverage, batch_size,
                                       errors):
    # Dispatch is asynchronous: the next batch decodes while this one runs.
    outputs = forward(params, batch['clips'])
    if pending is not None:
      _collect(parts, *pending)
    pending = batch, outputs
  if pending is not None:
    _collect(parts, *pending)
  return _predictions(videos, parts, errors, method)


def _collect(parts: dict[str, list[np.ndarray]], batch: dict[str, np.ndarray],
             outputs: dict[str, jax.Array]):
  mask = batch['mask']
  rows = {k: batch[k] for k in ('video', 'clip', 'crop', 'start')}
  rows.update({k: np.asarray(v) for k, v in outputs.items()})
  for key, value in rows.items():
    parts.setdefault(key, []).append(value[mask])


def _predictions(videos: Sequence[clip_lib.Video],
                 parts: dict[str, list[np.ndarray]], errors: dict[int, str],
                 method: tuple[str, str]) -> list[Prediction]:
  views = {k: np.concatenate(v) for k, v in parts.items()}
  means = {k: long_video.average_by_video(views[k], views['video'],
                                          len(videos))
           for k in ('logits', 'features') if k in views}
  results = []
  for i, video in enumerate(videos):
    path = getattr(video, 'path', f'video {i}')
    if i in errors or not views:
      results.append(Prediction(path, error=errors.get(i, 'no views')))
      continue
    rows = views['video'] == i
    get = lambda k, rows=rows: views[k][rows] if k in views else None
    mean = lambda k, i=i: means[k][i] if k in means else None
    scores = None
    if 'logits' in views:
      scores = np.asarray(combine_views(views['logits'][rows], *method)[1])
    results.append(Prediction(
        path, scores=scores, logits=mean('logits'),
        features=mean('features'), clip=get('clip'), crop=get('crop'),
        start=get('start'), view_scores=get('scores'),
        view_logits=get('logits'), view_features=get('features')))
  return results


def label_names(config) -> list[str]:
  """Class names by index: the checkpoint's own (`config.data.class_names`),
  else its dataset's (`datasets.class_names`).

  Raises:
    ValueError: their count is not the model's class count.
  """
  count = config.model.num_classes
  names = list(config.data.class_names)
  if names:
    source = 'the checkpoint'
  else:
    names = datasets.class_names(config)
    source = f'its dataset {config.data.dataset}'
  if len(names) != count:
    raise ValueError(
        f'The model has {count} classes but {source} {len(names)} class '
        'names: give the checkpoint its names (python -m tsformer_jax.'
        'convert SRC OUT --class_names=FILE, one name per line).')
  return names
