r"""Classifies video files and extracts their features with a checkpoint.

  python -m tsformer_jax.predict --checkpoint=CKPT VIDEO [VIDEO ...]
      [--top_k=5 | --threshold=0.5] [--json]
      [--clips=N | --clip_stride=SECONDS] [--crops=C]
      [--batch_size=B] [--features_out=FILE.npz [--overwrite]]
      [--decode_timeout_s=S] [--view_scores=logit_sum|softmax_mean]

CKPT: any checkpoint `tsformer_jax.load_checkpoint` reads, e.g. a training
workdir's `checkpoints/` (its latest step). Clips are cut, cropped and
normalised as evaluation does, with the checkpoint's config (its channel
order too, `data.channel_order`: BGR for the original's SSv2 models and
those converted from them): by default evaluation's own views
(`data.test_num_clips` clips x `data.test_num_crops` crops);
`--clips=N` takes N clips evenly spaced over the whole video and
`--clip_stride=S` one every S seconds from start to end, as the paper does
for long videos (centre crops, unless `--crops=3`). A video's views
combine as the checkpoint's `data.test_view_scores` says (`--view_scores`
replaces it): with 'logit_sum', the original's (the views' logits summed),
the probabilities shown are the softmax of the views' mean logits, which
ranks the classes as the sum does; with 'softmax_mean', the views' softmaxes
averaged. The clips of all videos run through one compiled forward pass in
batches of B (the last one padded).

A multi-label checkpoint (a sigmoid head, `model.loss='sigmoid'`) scores
each class on its own: a video's probabilities are its views' sigmoid
probabilities averaged (whatever --view_scores says), and it shows the
classes whose probability is at least `--threshold` (default 0.5), best
first; --json lists them under `labels`, beside `top_k`. `--threshold`
with a softmax head is an error: it applies to sigmoid models (use
--top_k).

`--features_out` writes an .npz: `paths` [V], `errors` [V] ('' where the
video was read), `video_features` [V, D] (class-token features averaged per
video; NaN for a failed video), `clip_features` [N, D] with `clip_video`,
`clip_index`, `clip_crop` and `clip_start` [N] (video, clip, crop and first
frame of each view), and, with a classification head, `video_scores`
[V, C] (the probabilities shown), `video_logits` [V, C] (the views' mean
logits), `clip_scores` [N, C] (each view's softmax, or sigmoid) and
`clip_logits` [N, C]. Its name must end in .npz and its folder exist; an
existing file is replaced only with `--overwrite`. These are checked
before the checkpoint loads.

A video that cannot be read gets one line on stderr, `predict: error:
PATH: why.` (empty, a directory, no permission, audio only, not a video,
a decoder stalled past `data.decode_timeout_s`, ...); the others are still
classified, and the exit status is then 1. Files decode in a worker
process, killed when a clip takes longer than that time bound
(`--decode_timeout_s` replaces it; see `long_video`).
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
import sys

from absl import flags
import numpy as np

from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import evaluation
from tsformer_jax import long_video
from tsformer_jax import losses

_TOP_K = flags.DEFINE_integer('top_k', 5, 'Classes to show per video (at '
                              'most the class count).', lower_bound=1)
_THRESHOLD = flags.DEFINE_float(
    'threshold', None, 'A sigmoid (multi-label) model shows the classes of '
    'at least this probability (default 0.5).')
flags.register_validator(_THRESHOLD,
                         lambda t: t is None or 0.0 <= t <= 1.0,
                         'must be a probability, from 0 to 1.')
# A sigmoid head's classes are those of at least this probability.
DEFAULT_THRESHOLD = 0.5
_CLIPS = flags.DEFINE_integer('clips', None, 'Clips evenly spaced over each '
                              'whole video (default: evaluation\'s views).',
                              lower_bound=1)
_CLIP_STRIDE = flags.DEFINE_float('clip_stride', None, 'A clip every this '
                                  'many seconds (above 0), from the first '
                                  'frame to the last.')
# lower_bound admits 0, which would never move on to the next clip.
flags.register_validator(_CLIP_STRIDE, lambda s: s is None or s > 0,
                         'must be above 0 seconds.')
_CROPS = flags.DEFINE_enum('crops', None, ['1', '3'], 'Crops per clip with '
                           '--clips or --clip_stride (default 1, the '
                           'centre).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Views per forward '
                                   'pass (default config.eval_batch_size).',
                                   lower_bound=1)
_FEATURES_OUT = flags.DEFINE_string('features_out', None, 'Write the '
                                    'class-token features to this .npz (an '
                                    'existing one only with --overwrite).')
_VIEW_SCORES = flags.DEFINE_enum(
    'view_scores', None, list(evaluation.VIEW_SCORES), 'How a video\'s '
    'views combine (default: the checkpoint\'s data.test_view_scores).')
_DECODE_TIMEOUT_S = flags.DEFINE_float(
    'decode_timeout_s', None, 'Seconds a clip may take to decode before its '
    'video counts as bad (0: no bound; default: the checkpoint\'s '
    'data.decode_timeout_s).')


def error_line(prediction: evaluation.Prediction) -> str:
  """`PATH: why.` on one line, the path once, for a video that could not
  be read."""
  message = prediction.error or 'unreadable'
  prefix = f'{prediction.path}: '
  while message.startswith(prefix):
    message = message[len(prefix):]
  message = ' '.join(message.split())  # A decoder's text may break lines.
  if not message.endswith('.'):
    message += '.'
  return f'{prediction.path}: {message}'


def format_text(predictions: Sequence[evaluation.Prediction],
                names: Sequence[str], top_k: int,
                threshold: float | None = None) -> str:
  """Per video: its path and views, then one `probability  label` line per
  class of its top k, or with a `threshold` (sigmoid heads) per class of at
  least that probability (`(none >= 0.5)` where there is none)."""
  lines = []
  for p in predictions:
    if p.error is not None:
      continue
    views = len(p.clip)
    lines.append(f'{p.path} ({views} view{"s" if views != 1 else ""})')
    shown = p.top_k(top_k) if threshold is None else p.above(threshold)
    lines.extend(f'  {prob:.4f}  {names[c]}' for c, prob in shown)
    if not shown:
      lines.append(f'  (none >= {threshold:g})')
  return '\n'.join(lines)


def to_json(predictions: Sequence[evaluation.Prediction], names: Sequence[str],
            top_k: int, checkpoint: str, threshold: float | None = None
            ) -> dict:
  """One JSON-ready document: per video its path, error (or null), number
  of views and top-k `{index, label, probability}`; with a `threshold`
  (sigmoid heads), also `labels`, those of at least that probability."""
  entry = lambda pairs: [dict(index=c, label=names[c], probability=prob)
                         for c, prob in pairs]
  videos = []
  for p in predictions:
    video = dict(path=p.path, error=p.error, views=len(p.clip),
                 top_k=entry(p.top_k(top_k)))
    if threshold is not None:
      video['labels'] = entry(p.above(threshold))
    videos.append(video)
  document = dict(checkpoint=checkpoint, videos=videos)
  if threshold is not None:
    document['threshold'] = threshold
  return document


def feature_arrays(predictions: Sequence[evaluation.Prediction]
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
    for name in ('scores', 'logits'):
      per_video = np.full((len(predictions),) + ok[0][1].scores.shape,
                          np.nan, np.float32)
      for i, p in ok:
        per_video[i] = getattr(p, name)
      arrays[f'video_{name}'] = per_video
      arrays[f'clip_{name}'] = np.concatenate(
          [getattr(p, f'view_{name}') for _, p in ok])
  return arrays


def _coverage() -> long_video.Coverage | None:
  if _CLIPS.value is not None and _CLIP_STRIDE.value is not None:
    raise cli.Error('Give --clips or --clip_stride, not both.')
  if _CLIPS.value is None and _CLIP_STRIDE.value is None:
    if _CROPS.value is not None:
      raise cli.Error('--crops goes with --clips or --clip_stride; '
                      'evaluation\'s views take data.test_num_crops.')
    return None
  return long_video.Coverage(num_clips=_CLIPS.value,
                             stride_seconds=_CLIP_STRIDE.value,
                             num_crops=int(_CROPS.value or 1))


def _check_features_out(path: str):
  """Fails now, not after all the compute, where `path` cannot be written."""
  if not path.endswith('.npz'):
    # numpy would add the suffix, writing another file than the one named.
    raise cli.Error(f'--features_out={path}: name an .npz file, e.g. '
                    f'--features_out={path}.npz.')
  folder = os.path.dirname(path) or '.'
  if not os.path.isdir(folder):
    raise cli.Error(f'--features_out={path}: there is no folder {folder}; '
                    'create it first.')
  if os.path.isdir(path):
    raise cli.Error(f'--features_out={path} is a folder: name an .npz file.')
  if os.path.exists(path) and not cli.OVERWRITE.value:
    raise cli.Error(f'--features_out={path} exists: pass --overwrite to '
                    'replace it.')


def _threshold(config, checkpoint: str) -> float | None:
  """The probability a sigmoid head's classes must reach to be shown; None
  for a softmax head (top k), which refuses --threshold."""
  if losses.loss_name(config) == 'sigmoid':
    return (DEFAULT_THRESHOLD if _THRESHOLD.value is None
            else _THRESHOLD.value)
  if _THRESHOLD.value is not None:
    raise cli.Error(f'--threshold applies to sigmoid (multi-label) models; '
                    f'{checkpoint} has a softmax head (one class per '
                    'video): use --top_k.')
  return None


def _names(config, checkpoint: str) -> list[str]:
  """`evaluation.label_names`, else the class indices ('0', '1', ...)
  where the checkpoint has no names and its dataset's folder cannot be read
  (predicting elsewhere than where it trained), with one line saying so."""
  try:
    return evaluation.label_names(config)
  except OSError:
    where = config.data.data_dir or 'no config.data.data_dir'
    print(f'predict: warning: {checkpoint} carries no class names and its '
          f'dataset\'s ({config.data.dataset}, {where}) cannot be read: '
          'showing class indices. To name them: python -m tsformer_jax.'
          f'convert {checkpoint} OUT --class_names=FILE.', file=sys.stderr)
    return [str(i) for i in range(config.model.num_classes)]
  except ValueError as e:
    raise cli.Error(str(e)) from e


@cli.takes(cli.CHECKPOINT, cli.JSON, cli.OVERWRITE)
def main(argv: Sequence[str]) -> int:
  paths = list(argv[1:])
  if not paths or not cli.CHECKPOINT.value:
    raise cli.Error('Pass --checkpoint=CKPT and at least one VIDEO '
                    '(--help shows more).')
  coverage = _coverage()
  features_out = _FEATURES_OUT.value
  if features_out:
    _check_features_out(features_out)
  checkpoint = cli.CHECKPOINT.value
  try:
    config, params = checkpoints.load_checkpoint(checkpoint)
  except (ValueError, OSError) as e:
    raise cli.Error(str(e), status=1) from e
  if _DECODE_TIMEOUT_S.value is not None:
    with config.unlocked():
      config.data.decode_timeout_s = _DECODE_TIMEOUT_S.value
  if _VIEW_SCORES.value is not None:
    with config.unlocked():
      config.data.test_view_scores = _VIEW_SCORES.value
  if not config.model.num_classes and not features_out:
    raise cli.Error(f'{checkpoint} has no classification head '
                    '(model.num_classes = 0): pass --features_out to write '
                    'its features.')
  try:
    threshold = _threshold(config, checkpoint)
  except ValueError as e:  # An unknown model.loss.
    raise cli.Error(str(e)) from e
  names = _names(config, checkpoint) if config.model.num_classes else []
  try:
    predictions = evaluation.predict_videos(
        config, params, paths, coverage=coverage,
        batch_size=_BATCH_SIZE.value, with_features=features_out is not None)
  except ValueError as e:
    raise cli.Error(str(e)) from e
  for p in predictions:
    if p.error is not None:
      print(f'predict: error: {error_line(p)}', file=sys.stderr)
  if cli.JSON.value:
    print(json.dumps(to_json(predictions, names, _TOP_K.value, checkpoint,
                             threshold), indent=1))
  elif names:
    print(format_text(predictions, names, _TOP_K.value, threshold))
  if features_out and any(p.error is None for p in predictions):
    np.savez(features_out, **feature_arrays(predictions))
  return 1 if any(p.error is not None for p in predictions) else 0


if __name__ == '__main__':
  cli.run(main)
