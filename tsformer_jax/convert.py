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

from collections.abc import Sequence
import logging
import pickle
import sys

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from tsformer_jax import checkpoints


def _parse(argv: Sequence[str]) -> tuple[list[str], flags.FlagValues]:
  """Flags on a fresh `FlagValues`, so that main() runs more than once."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', None, 'Config to convert into (default: the checkpoint\'s).',
      flag_values=values, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_integer('num_classes', None, 'Overrides the class count.',
                       flag_values=values)
  flags.DEFINE_enum('format', 'auto', ['auto', *checkpoints.FORMATS],
                    'Format of SRC.', flag_values=values)
  flags.DEFINE_enum('pos_resize', '2d', list(checkpoints.POS_RESIZE_MODES),
                    'Position embedding resampling: 2d grid or the '
                    'original\'s 1d sequence (both nearest).',
                    flag_values=values)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing OUT.',
                    flag_values=values)
  positional = values(list(argv))[1:]
  return positional, values


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  help_asked = any(a in ('-h', '--help', '-help') for a in argv[1:])
  try:
    positional, values = _parse([a for a in argv
                                 if a not in ('-h', '--help', '-help')])
  except flags.Error as e:
    print(f'convert: error: {e}', file=sys.stderr)
    return 2
  if help_asked or len(positional) != 2:
    print(__doc__ + '\n' + values.get_help(), file=sys.stderr)
    return 0 if help_asked else 2
  src, out = positional
  _log_adaptations()
  try:
    config, params = checkpoints.load_checkpoint(
        src, values.config, format=values.format,
        num_classes=values.num_classes, pos_resize=values.pos_resize)
    path = checkpoints.save_checkpoint(out, config, params,
                                       overwrite=values.overwrite)
  except (ValueError, OSError, pickle.UnpicklingError) as e:
    print(f'convert: error: {e}', file=sys.stderr)
    return 1
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
  sys.exit(main())
