r"""Classifies video files and extracts their features with a checkpoint.

  python -m tsformer_jax.predict --checkpoint=CKPT VIDEO [VIDEO ...]
      [--top_k=5] [--json] [--clips=N | --clip_stride=SECONDS] [--crops=C]
      [--batch_size=B] [--features_out=FILE.npz]

CKPT: any checkpoint `tsformer_jax.load_checkpoint` reads, e.g. a training
workdir's `checkpoints/` (its latest step). Clips are cut, cropped and
normalised as evaluation does, with the checkpoint's config: by default
evaluation's own views (`data.test_num_clips` clips x `data.test_num_crops`
crops); `--clips=N` takes N clips evenly spaced over the whole video and
`--clip_stride=S` one every S seconds from start to end, as the paper does
for long videos (centre crops, unless `--crops=3`). Scores are softmaxes
averaged over a video's views. The clips of all videos run through one
compiled forward pass in batches of B (the last one padded).

`--features_out` writes an .npz: `paths` [V], `errors` [V] ('' where the
video was read), `video_features` [V, D] (class-token features averaged per
video; NaN for a failed video), `clip_features` [N, D] with `clip_video`,
`clip_index`, `clip_crop` and `clip_start` [N] (video, clip, crop and first
frame of each view), and, with a classification head, `video_scores`
[V, C] and `clip_scores` [N, C].

A video that cannot be read gets a one-line error on stderr naming it; the
others are still classified, and the exit status is then 1.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import json
import logging
import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from tsformer_jax import checkpoints
from tsformer_jax import datasets
from tsformer_jax import input_pipeline
from tsformer_jax import long_video
from tsformer_jax import model as model_lib
from tsformer_jax.datasets import video_files

# forward(params, clips [B, T, H, W, 3]) -> {'scores': [B, C] softmax,
# 'features': [B, D]}, either key optional.
Forward = Callable[[dict, np.ndarray], dict[str, np.ndarray]]


@dataclasses.dataclass
class Prediction:
  """What the model says about one video.

  Views are the video's clips times crops, clip-major. Per-view arrays
  hold the views of a video that was read; they are empty where it failed.

  Attributes:
    path: the video file (`video {i}` for a video given in memory).
    error: why the video could not be read; None if it was.
    scores: float32 `[C]`, softmax scores averaged over the views; None
      where the video failed or the model has no head.
    features: float32 `[D]`, class-token features averaged over the views;
      None unless asked for, or where the video failed.
    clip: int32 `[V]`, the clip of each view, in time order.
    crop: int32 `[V]`, its crop.
    start: int64 `[V]`, its clip's first frame.
    view_scores: float32 `[V, C]` or None, as `scores`.
    view_features: float32 `[V, D]` or None, as `features`.
  """
  path: str
  error: str | None = None
  scores: np.ndarray | None = None
  features: np.ndarray | None = None
  clip: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int32))
  crop: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int32))
  start: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0,), np.int64))
  view_scores: np.ndarray | None = None
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

  With `with_features`, one pass gives both the scores and the features the
  head reads (the same as `model.apply` with `num_classes = 0`). A model
  without a head (`num_classes = 0`) gives its features only.
  """
  model = model_lib.create_model(config)

  def forward(params, clips):
    variables = {'params': params}
    if not config.model.num_classes:
      return dict(features=model.apply(variables, clips))
    if not with_features:
      return dict(scores=jax.nn.softmax(model.apply(variables, clips)))
    logits, state = model.apply(variables, clips,
                                capture_intermediates=_is_final_norm,
                                mutable=['intermediates'])
    features = state['intermediates']['norm']['__call__'][0]
    return dict(scores=jax.nn.softmax(logits),
                features=features.astype(jnp.float32))

  return forward


def predict_videos(config, params, videos: Sequence[str | input_pipeline.Video],
                   *, coverage: long_video.Coverage | None = None,
                   batch_size: int | None = None, with_features: bool = False,
                   forward: Forward | None = None) -> list[Prediction]:
  """Scores (and features) of each video, averaged over its views.

  Args:
    config: the model's config (`load_checkpoint` returns it); its
      `config.data` says how clips are sampled and normalised.
    params: the model's parameters.
    videos: file paths, or `input_pipeline.Video`s.
    coverage: which clips and crops; None takes evaluation's views.
    batch_size: views per forward pass; None takes
      `config.eval_batch_size`.
    with_features: also return the class-token features.
    forward: replaces the model's jitted `forward_fn(config,
      with_features)`, e.g. by a fake model in tests.

  Returns:
    One `Prediction` per video, in order; a video that could not be read
    has its `error` set and the others are unaffected.
  """
  spec = input_pipeline.clip_spec(config)
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
  return _predictions(videos, parts, errors)


def _collect(parts: dict[str, list[np.ndarray]], batch: dict[str, np.ndarray],
             outputs: dict[str, jax.Array]):
  mask = batch['mask']
  rows = {k: batch[k] for k in ('video', 'clip', 'crop', 'start')}
  rows.update({k: np.asarray(v) for k, v in outputs.items()})
  for key, value in rows.items():
    parts.setdefault(key, []).append(value[mask])


def _predictions(videos: Sequence[input_pipeline.Video],
                 parts: dict[str, list[np.ndarray]], errors: dict[int, str]
                 ) -> list[Prediction]:
  views = {k: np.concatenate(v) for k, v in parts.items()}
  means = {k: long_video.average_by_video(views[k], views['video'],
                                          len(videos))
           for k in ('scores', 'features') if k in views}
  results = []
  for i, video in enumerate(videos):
    path = getattr(video, 'path', f'video {i}')
    if i in errors or not views:
      results.append(Prediction(path, error=errors.get(i, 'no views')))
      continue
    rows = views['video'] == i
    get = lambda k, rows=rows: views[k][rows] if k in views else None
    results.append(Prediction(
        path, scores=means['scores'][i] if 'scores' in means else None,
        features=means['features'][i] if 'features' in means else None,
        clip=get('clip'), crop=get('crop'), start=get('start'),
        view_scores=get('scores'), view_features=get('features')))
  return results


def label_names(config) -> list[str]:
  """Class names by index (`datasets.class_names`), or index strings where
  the dataset's names do not fit the model's class count."""
  count = config.model.num_classes
  try:
    names = datasets.class_names(config)
  except (ValueError, OSError) as e:
    logging.warning('No class names (%s); printing class indices.', e)
    return [str(i) for i in range(count)]
  if len(names) != count:
    logging.warning('%s has %d class names but the model %d classes; '
                    'printing class indices.', config.dataset.name,
                    len(names), count)
    return [str(i) for i in range(count)]
  return names


def error_line(prediction: Prediction) -> str:
  """`PATH: why`, once, for a video that could not be read."""
  message = prediction.error or ''
  prefix = f'{prediction.path}: '
  message = message[len(prefix):] if message.startswith(prefix) else message
  return f'{prediction.path}: cannot be read: {message}'


def format_text(predictions: Sequence[Prediction], names: Sequence[str],
                top_k: int) -> str:
  """Per video: its path and views, then one `probability  label` line per
  class of its top k."""
  lines = []
  for p in predictions:
    if p.error is not None:
      continue
    views = len(p.clip)
    lines.append(f'{p.path} ({views} view{"s" if views != 1 else ""})')
    lines.extend(f'  {prob:.4f}  {names[c]}' for c, prob in p.top_k(top_k))
  return '\n'.join(lines)


def to_json(predictions: Sequence[Prediction], names: Sequence[str],
            top_k: int, checkpoint: str) -> dict:
  """One JSON-ready document: per video its path, error (or null), number
  of views and top-k `{index, label, probability}`."""
  return dict(checkpoint=checkpoint, videos=[
      dict(path=p.path, error=p.error, views=len(p.clip),
           top_k=[dict(index=c, label=names[c], probability=prob)
                  for c, prob in p.top_k(top_k)])
      for p in predictions])


def feature_arrays(predictions: Sequence[Prediction]
                   ) -> dict[str, np.ndarray]:
  """The arrays `--features_out` writes (see the module doc)."""
  ok = [(i, p) for i, p in enumerate(predictions) if p.error is None]
  if not ok:
    raise ValueError('No video could be read: no features to write.')
  dim = ok[0][1].features.shape[-1]
  video_features = np.full((len(predictions), dim), np.nan, np.float32)
  arrays = dict(
      paths=np.asarray([p.path for p in predictions], str),
      errors=np.asarray([p.error or '' for p in predictions], str),
      video_features=video_features,
      clip_features=np.concatenate([p.view_features for _, p in ok]),
      clip_video=np.concatenate([np.full(len(p.clip), i, np.int32)
                                 for i, p in ok]),
      clip_index=np.concatenate([p.clip for _, p in ok]),
      clip_crop=np.concatenate([p.crop for _, p in ok]),
      clip_start=np.concatenate([p.start for _, p in ok]))
  for i, p in ok:
    video_features[i] = p.features
  if ok[0][1].scores is not None:
    video_scores = np.full((len(predictions),) + ok[0][1].scores.shape,
                           np.nan, np.float32)
    for i, p in ok:
      video_scores[i] = p.scores
    arrays.update(video_scores=video_scores, clip_scores=np.concatenate(
        [p.view_scores for _, p in ok]))
  return arrays


def _parse(argv: Sequence[str]) -> tuple[list[str], flags.FlagValues]:
  """Flags on a fresh `FlagValues`, so that main() runs more than once."""
  values = flags.FlagValues()
  flags.DEFINE_string('checkpoint', None, 'The checkpoint (any format '
                      'load_checkpoint reads).', flag_values=values)
  flags.DEFINE_integer('top_k', 5, 'Classes to show per video (at most the '
                       'class count).', lower_bound=1, flag_values=values)
  flags.DEFINE_bool('json', False, 'Print one JSON document.',
                    flag_values=values)
  flags.DEFINE_integer('clips', None, 'Clips evenly spaced over each whole '
                       'video (default: evaluation\'s views).', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_float('clip_stride', None, 'A clip every this many seconds, '
                     'from the first frame to the last.', flag_values=values)
  flags.DEFINE_enum('crops', None, ['1', '3'], 'Crops per clip with --clips '
                    'or --clip_stride (default 1, the centre).',
                    flag_values=values)
  flags.DEFINE_integer('batch_size', None, 'Views per forward pass (default '
                       'config.eval_batch_size).', lower_bound=1,
                       flag_values=values)
  flags.DEFINE_string('features_out', None, 'Write the class-token features '
                      'to this .npz.', flag_values=values)
  positional = values(list(argv))[1:]
  return positional, values


def _coverage(values: flags.FlagValues) -> long_video.Coverage | None:
  if values.clips is not None and values.clip_stride is not None:
    raise ValueError('Give --clips or --clip_stride, not both.')
  if values.clips is None and values.clip_stride is None:
    if values.crops is not None:
      raise ValueError('--crops goes with --clips or --clip_stride; '
                       'evaluation\'s views take data.test_num_crops.')
    return None
  return long_video.Coverage(num_clips=values.clips,
                             stride_seconds=values.clip_stride,
                             num_crops=int(values.crops or 1))


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  help_asked = any(a in ('-h', '--help', '-help') for a in argv[1:])
  try:
    paths, values = _parse([a for a in argv
                            if a not in ('-h', '--help', '-help')])
    coverage = _coverage(values)
  except (flags.Error, ValueError) as e:
    print(f'predict: error: {e}', file=sys.stderr)
    return 2
  if help_asked or not paths or not values.checkpoint:
    print(__doc__ + '\n' + values.get_help(), file=sys.stderr)
    return 0 if help_asked else 2
  try:
    config, params = checkpoints.load_checkpoint(values.checkpoint)
  except (ValueError, OSError) as e:
    print(f'predict: error: {e}', file=sys.stderr)
    return 1
  if not config.model.num_classes and not values.features_out:
    print(f'predict: error: {values.checkpoint} has no classification head '
          '(model.num_classes = 0): pass --features_out to write its '
          'features.', file=sys.stderr)
    return 2
  try:
    predictions = predict_videos(
        config, params, paths, coverage=coverage,
        batch_size=values.batch_size,
        with_features=values.features_out is not None)
  except ValueError as e:
    print(f'predict: error: {e}', file=sys.stderr)
    return 2
  for p in predictions:
    if p.error is not None:
      print(f'predict: error: {error_line(p)}', file=sys.stderr)
  names = label_names(config) if config.model.num_classes else []
  if values.json:
    print(json.dumps(to_json(predictions, names, values.top_k,
                             values.checkpoint), indent=1))
  elif names:
    print(format_text(predictions, names, values.top_k))
  if values.features_out and any(p.error is None for p in predictions):
    np.savez(values.features_out, **feature_arrays(predictions))
  return 1 if any(p.error is not None for p in predictions) else 0


if __name__ == '__main__':
  sys.exit(main())
