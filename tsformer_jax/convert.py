r"""Converts a checkpoint of any supported format into our orbax format.

  python -m tsformer_jax.convert SRC OUT [--config=configs/divided.py:hr
      --adapt] [--num_classes=N] [--class_names=FILE] [--format=auto]
      [--pos_resize=2d] [--overwrite]

SRC: a Hugging Face TimeSformer directory or Hub id, an original `.pyth`,
an ImageNet ViT (`.npz`, Hugging Face or timm layout) or one of our orbax
checkpoints (`checkpoints.FORMATS`). Without `--config` the model is the
checkpoint's own, as its file describes it (an image ViT becomes divided
attention over 8 frames). With `--config`, a video checkpoint that does not
fit it is refused, naming what would change, unless `--adapt` asks for the
change (embeddings resampled, scheme inflated, a new head); `--num_classes`
asks for a new head alone. Every change is printed. OUT, written only once
complete, is then read by `tsformer_jax.load_checkpoint(OUT)`.
"""

from __future__ import annotations

import logging
import pickle
import sys

from absl import flags

from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import config_lib

_NUM_CLASSES = flags.DEFINE_integer('num_classes', None,
                                    'Overrides the class count.')
_POS_RESIZE = flags.DEFINE_enum(
    'pos_resize', '2d', list(checkpoints.POS_RESIZE_MODES),
    "Position embedding resampling: 2d grid or the original's 1d sequence "
    '(both nearest).')
_ADAPT = flags.DEFINE_bool(
    'adapt', False, 'Fit a video checkpoint to --config where it differs: '
    'resample its embeddings, inflate its scheme, draw a new head. Without '
    'it such a conversion stops and names the changes.')
_CLASS_NAMES = flags.DEFINE_string(
    'class_names', None, 'A text file of class names, one per line in class '
    'order, for a checkpoint that does not carry its own (an original '
    '.pyth).')


@cli.takes(cli.CONFIG, cli.FORMAT, cli.OVERWRITE)
def main(argv) -> int:
  if len(argv) != 3:
    raise cli.Error('Pass SRC and OUT: python -m tsformer_jax.convert SRC '
                    'OUT [--config=...] (--help shows more).')
  src, out = argv[1:]
  try:
    config, params = load(src, 'convert', cli.FORMAT.value or 'auto')
    path = checkpoints.save_checkpoint(out, config, params,
                                       overwrite=cli.OVERWRITE.value)
  except (ValueError, OSError, pickle.UnpicklingError) as e:
    raise cli.Error(str(e), status=1) from e
  print(f'{src} -> {path}: {cli.describe(config, params)}.')
  return 0


def load(src: str, program: str, format: str = 'auto'):
  """`(config, params)` of SRC as the flags ask, each change printed as
  'PROGRAM: ...': fitted to --config (where a video checkpoint differs,
  only with --adapt), --num_classes, --pos_resize, --class_names. `export`
  loads through this as well.

  Raises:
    ValueError: SRC does not fit --config without changes --adapt allows.
  """
  _log_adaptations(program)
  config, params = checkpoints.load_checkpoint(
      src, cli.CONFIG.value, format=format, num_classes=_NUM_CLASSES.value,
      pos_resize=_POS_RESIZE.value, fit=_ADAPT.value)
  if _CLASS_NAMES.value:
    config = config_lib.with_class_names(config,
                                         _read_names(_CLASS_NAMES.value))
  return config, params


def _read_names(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def _log_adaptations(program: str):
  """Prints what checkpoints.py changes in the weights (not orbax's logs)."""
  logger = logging.getLogger('tsformer_jax')
  handler = next((h for h in logger.handlers if h.get_name() == 'convert'),
                 None)
  if handler is None:
    handler = logging.StreamHandler()
    handler.set_name('convert')
    logger.addHandler(handler)
    logger.propagate = False
  handler.setFormatter(logging.Formatter(f'{program}: %(message)s'))
  # The current stderr (an in-process run may have swapped it); the last
  # one may be closed, so no flush as setStream would.
  handler.stream = sys.stderr
  logger.setLevel(logging.INFO)


if __name__ == '__main__':
  cli.run(main)
