r"""Converts a checkpoint of any supported format into our orbax format.

  python -m tsformer_jax.convert SRC OUT [--config=configs/divided.py:hr]
      [--num_classes=N] [--format=auto] [--pos_resize=2d] [--overwrite]

SRC: a Hugging Face TimeSformer directory, an original `.pyth`, an ImageNet
ViT (`.npz`, Hugging Face or timm layout) or one of our orbax checkpoints
(`checkpoints.FORMATS`). Without `--config` the model is the checkpoint's own
(an image ViT becomes divided attention over 8 frames); with it, the weights
are fitted to that config (embeddings resampled, a new head if the class
count differs). OUT, written only once complete, is then read by
`tsformer_jax.load_checkpoint(OUT)`.
"""

from __future__ import annotations

import logging
import pickle
import sys

from absl import flags
import jax
import numpy as np

from tsformer_jax import checkpoints
from tsformer_jax import cli

_NUM_CLASSES = flags.DEFINE_integer('num_classes', None,
                                    'Overrides the class count.')
_FORMAT = flags.DEFINE_enum('format', 'auto', ['auto', *checkpoints.FORMATS],
                            'Format of SRC.')
_POS_RESIZE = flags.DEFINE_enum(
    'pos_resize', '2d', list(checkpoints.POS_RESIZE_MODES),
    "Position embedding resampling: 2d grid or the original's 1d sequence "
    '(both nearest).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing OUT.')


def main(argv) -> int:
  if len(argv) != 3:
    raise cli.Error('Pass SRC and OUT: python -m tsformer_jax.convert SRC '
                    'OUT [--config=...] (--help shows more).')
  src, out = argv[1:]
  _log_adaptations()
  try:
    config, params = checkpoints.load_checkpoint(
        src, cli.CONFIG.value, format=_FORMAT.value,
        num_classes=_NUM_CLASSES.value, pos_resize=_POS_RESIZE.value)
    path = checkpoints.save_checkpoint(out, config, params,
                                       overwrite=_OVERWRITE.value)
  except (ValueError, OSError, pickle.UnpicklingError) as e:
    raise cli.Error(str(e), status=1) from e
  m = config.model
  count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  print(f'{src} -> {path}: {m.attention}, {m.num_frames} x '
        f'{tuple(m.image_size)}, {m.num_classes} classes, {count:,} '
        'parameters.')
  return 0


def _log_adaptations():
  """Prints what checkpoints.py changes in the weights (not orbax's logs)."""
  logger = logging.getLogger('tsformer_jax')
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('convert: %(message)s'))
    logger.addHandler(handler)
    logger.propagate = False
  logger.setLevel(logging.INFO)


if __name__ == '__main__':
  cli.run(main)
