"""Running a model over whole videos: views, batches, per-video averages.

`predict_videos` classifies videos (files or arrays) and extracts their
features: it cuts each into the views a `long_video.Coverage` names
(evaluation's own views by default), runs them through one compiled
forward pass in fixed-size batches shared across videos, and combines the
views' scores (`combine_views`) and averages their features per video. The
main job's whole-video evaluation and `python -m tsformer_jax.predict` both
call it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from tsformer_jax import clip_lib
from tsformer_jax import datasets
from tsformer_jax import long_video
from tsformer_jax import model as model_lib
from tsformer_jax.datasets import video_files

# forward(params, clips [B, T, H, W, 3] of pixel values, uint8 or float32)
# -> {'logits': [B, C], 'scores': [B, C] their softmax, 'features': [B, D]};
# 'logits' and 'scores' come together or not at all (no head).
Forward = Callable[[dict, np.ndarray], dict[str, np.ndarray]]

# How a video's views combine into its scores (`config.data.test_view_scores`):
# 'logit_sum' as the original's test meter, which sums the views' logits and
# ranks the sums; 'softmax_mean' averages the views' softmax probabilities.
VIEW_SCORES = ('logit_sum', 'softmax_mean')


def view_scores(config) -> str:
  """`config.data.test_view_scores`, checked ('logit_sum' where the config
  has none, as an older checkpoint's)."""
  method = config.data.get('test_view_scores', 'logit_sum')
  if method not in VIEW_SCORES:
    raise ValueError(f'Unknown data.test_view_scores {method!r}; valid: '
                     f'{list(VIEW_SCORES)}.')
  return method


def combine_views(logits: jax.Array, method: str
                  ) -> tuple[jax.Array, jax.Array]:
  """One video's scores from its views' logits `[..., V, C]`.

  Returns:
    `ranking [..., C]`, the scores that rank the classes, and `probs
    [..., C]`, probabilities for the loss and for display. 'logit_sum': the
    logits summed over the views, and the softmax of their mean (which
    ranks alike). 'softmax_mean': the views' softmaxes averaged, both times.
  """
  if method == 'logit_sum':
    return logits.sum(-2), jax.nn.softmax(logits.mean(-2))
  if method == 'softmax_mean':
    probs = jax.nn.softmax(logits).mean(-2)
    return probs, probs
  raise ValueError(f'Unknown view scores {method!r}; valid: '
                   f'{list(VIEW_SCORES)}.')


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
      softmaxes averaged ('softmax_mean'); None where the video failed or
      the model has no head.
    logits: float32 `[C]` or None, the views' logits averaged (their sum,
      the original's test scores, over V).
    features: float32 `[D]`, class-token features averaged over the views;
      None unless asked for, or where the video failed.
    clip: int32 `[V]`, the clip of each view, in time order.
    crop: int32 `[V]`, its crop.
    start: int64 `[V]`, its clip's first frame.
    view_scores: float32 `[V, C]` or None, each view's softmax.
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
  channel_order = config.data.get('channel_order', 'rgb')

  def forward(params, clips):
    clips = clip_lib.device_normalize(clips, mean, std, channel_order)
    variables = {'params': params}
    if not config.model.num_classes:
      return dict(features=model.apply(variables, clips))
    if not with_features:
      logits = model.apply(variables, clips).astype(jnp.float32)
      return dict(logits=logits, scores=jax.nn.softmax(logits))
    logits, state = model.apply(variables, clips,
                                capture_intermediates=_is_final_norm,
                                mutable=['intermediates'])
    features = state['intermediates']['norm']['__call__'][0]
    logits = logits.astype(jnp.float32)
    return dict(logits=logits, scores=jax.nn.softmax(logits),
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
  method = view_scores(config)
  coverage = coverage or long_video.Coverage.evaluation(spec)
  batch_size = batch_size or config.eval_batch_size
  if forward is None:
    forward = jax.jit(
        forward_fn(config, with_features),
        compiler_options=model_lib.inference_compiler_options(config,
                                                             batch_size))
    params = jax.device_put(params)  # Once, not with every batch.
  videos = [video_files.VideoFile(os.fspath(v))
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
                 method: str) -> list[Prediction]:
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
      scores = np.asarray(combine_views(views['logits'][rows], method)[1])
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
  names = list(config.data.get('class_names') or ())
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
