r"""Converts a checkpoint of any supported format into our orbax format.

  python -m tsformer_jax.convert SRC OUT [--config=configs/divided.py:hr
      --adapt] [--num_classes=N] [--class_names=FILE] [--format=auto]
      [--pos_resize=2d] [--overwrite]

SRC: a Hugging Face TimeSformer directory or Hub id, an original `.pyth`,
an ImageNet ViT (`.npz`, Hugging Face or timm layout) or one of our orbax
checkpoints (`checkpoints.FORMATS`; `--format` names it where its files do
not). Without `--config` the model is the checkpoint's own, as its file
describes it (an image ViT becomes divided attention over 8 frames). With
`--config`, a video checkpoint that does not fit it is refused, naming what
would change, unless `--adapt` asks for the change (embeddings resampled,
scheme inflated, a new head); `--num_classes` asks for a new head alone.
Every change is printed. OUT, written only once complete, is then read by
`tsformer_jax.load_checkpoint(OUT)`.
"""

from __future__ import annotations

import pickle

from tsformer_jax import checkpoints
from tsformer_jax import cli


@cli.takes(*cli.LOADING, cli.OVERWRITE)
def main(argv) -> int:
  if len(argv) != 3:
    raise cli.Error('Pass SRC and OUT: python -m tsformer_jax.convert SRC '
                    'OUT [--config=...] (--help shows more).')
  src, out = argv[1:]
  try:
    config, params = cli.load_checkpoint(src, 'convert')
    path = checkpoints.save_checkpoint(out, config, params,
                                       overwrite=cli.OVERWRITE.value)
  except (ValueError, OSError, pickle.UnpicklingError) as e:
    raise cli.Error(str(e), status=1) from e
  print(f'{src} -> {path}: {cli.describe(config, params)}.')
  return 0


if __name__ == '__main__':
  cli.run(main)
