r"""Extracts one feature array per video, a row per window, for detection
models and frozen-feature evaluation.

  python -m tsformer_jax.features --checkpoint=CKPT --videos=LIST_OR_DIR \
      --out=DIR --stride_frames=S [--layer=-1] [--pool=cls|mean|tokens] \
      [--dtype=float32|float16] [--classes=FILE] [--windows_per_batch=B] \
      [--decode_workers=2]

Writes `DIR/<id>.npy` per video, `[windows, D]` (`--pool=cls` or `mean`)
or `[windows, T, H', W', D]` (`tokens`): row `i` is the window of
`model.num_frames` frames `data.sampling_rate` apart from source frame
`i * S` (see `extraction` for the last windows and short videos), with
`DIR/<id>.frames.json` (frames, fps, windows), `DIR/features.json` (the
settings and videos) and `DIR/failed.txt` (`feature_files`).

LIST_OR_DIR: a listing (`listing`: `path label,label` lines, or JSON lines;
labels optional, class names from --classes, else `classes.txt` beside
the listing, else the checkpoint's), or a folder whose video files are
all taken. Videos already done are skipped, so a rerun resumes; a rerun
with other settings into the same DIR stops. A video that cannot be read
gets one line on stderr and a line in failed.txt, and the exit status is
then 1. Several processes, each with its own devices, share the videos:
give each TSFORMER_NUM_PROCESSES=N and its TSFORMER_PROCESS_ID (0 to N - 1);
they need no coordinator, as they never wait for each other.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import sys

from absl import flags
import tqdm

from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import evaluation
from tsformer_jax import extraction
from tsformer_jax import feature_files
from tsformer_jax import listing
from tsformer_jax import sharding

_VIDEOS = flags.DEFINE_string('videos', None, 'A listing of videos (one '
                              'per line, labels optional) or a folder of '
                              'video files.')
_STRIDE_FRAMES = flags.DEFINE_integer('stride_frames', None, 'Source frames '
                                      'from one window\'s start to the next.',
                                      lower_bound=1)
_LAYER = flags.DEFINE_integer('layer', -1, '-1: the final normalised '
                              'output; k >= 0: the output of block k; other '
                              'negative values count back from -1.')
# A string, not an enum: a wrong value gets the library's one line.
_POOL = flags.DEFINE_string('pool', 'cls', 'cls (class token), mean (patch '
                            'tokens averaged) or tokens (the patch grid).')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'float32 or float16.')
_WINDOWS_PER_BATCH = flags.DEFINE_integer(
    'windows_per_batch', None, 'Windows per forward pass, split over the '
    'local devices (default config.eval_batch_size).', lower_bound=1)
_DECODE_WORKERS = flags.DEFINE_integer('decode_workers', 2, 'Videos decoded '
                                       'side by side.', lower_bound=1)


def _classes(videos: str, config) -> list[str] | None:
  """--classes, else classes.txt beside a listing, else the checkpoint's
  names (None where it has none)."""
  if cli.CLASSES.value:
    return listing.read_classes(cli.CLASSES.value)
  beside = os.path.join(os.path.dirname(os.path.abspath(videos)),
                        'classes.txt')
  if not os.path.isdir(videos) and os.path.isfile(beside):
    return listing.read_classes(beside)
  if not config.model.num_classes:
    return None
  try:
    return evaluation.label_names(config)
  except (OSError, ValueError):
    return None


def _failure_line(path: str, why: str):
  tqdm.tqdm.write(f'features: error: {path}: {why}', file=sys.stderr)


@cli.takes(cli.CHECKPOINT, cli.OUT, cli.CLASSES)
def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise cli.Error(f'Unexpected arguments {argv[1:]}: the videos go in '
                    '--videos=LIST_OR_DIR.')
  if not (cli.CHECKPOINT.value and _VIDEOS.value and cli.OUT.value and
          _STRIDE_FRAMES.value):
    raise cli.Error('Pass --checkpoint=CKPT --videos=LIST_OR_DIR --out=DIR '
                    '--stride_frames=S (--help shows more).')
  videos, out = _VIDEOS.value, cli.OUT.value
  with cli.expected_as_error():
    settings = extraction.Settings(
        cli.CHECKPOINT.value, _STRIDE_FRAMES.value, layer=_LAYER.value,
        pool=_POOL.value, dtype=_DTYPE.value,
        batch_size=_WINDOWS_PER_BATCH.value,
        decode_workers=_DECODE_WORKERS.value)
    feature_files.check_out(out)
  try:
    config, params = checkpoints.load_checkpoint(settings.checkpoint)
  except (ValueError, OSError) as e:
    raise cli.Error(str(e), status=1) from e
  with cli.expected_as_error():
    classes = None
    if os.path.isdir(videos):
      entries = feature_files.folder_videos(videos)
    else:
      classes = _classes(videos, config)
      entries = feature_files.listed_videos(videos, classes or [])
    report = extraction.extract(
        config, params, entries, out, settings, classes=classes,
        on_failure=_failure_line,
        process_index=int(os.environ.get(sharding.PROCESS_ID_ENV, 0)),
        process_count=int(os.environ.get(sharding.NUM_PROCESSES_ENV, 1)))
  print(f'features: {report.written} written, {report.skipped} already '
        f'done, {len(report.failed)} failed ({report.windows} windows in '
        f'{report.seconds:.1f} s after {report.setup_seconds:.1f} s of '
        f'setup) -> {out}', file=sys.stderr)
  return 1 if report.failed else 0


if __name__ == '__main__':
  cli.run(main)
