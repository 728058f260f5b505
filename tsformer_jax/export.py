r"""Exports a checkpoint for PyTorch: Hugging Face or the original's `.pyth`.

  python -m tsformer_jax.export CHECKPOINT OUT [--to=hf|pyth]
      [--config=configs/divided.py:base --adapt] [--num_classes=N]
      [--class_names=FILE] [--format=auto] [--pos_resize=2d] [--overwrite]

CHECKPOINT: anything `tsformer_jax.load_checkpoint` reads, loaded with the
flags `convert` takes (`cli.LOADING`): with `--config`, a video checkpoint
that does not fit it is refused, naming what would change, unless `--adapt`
asks for the change; every change is printed.

`--to=hf` (default): OUT is a directory (`config.json`,
`model.safetensors`) that `transformers.TimesformerForVideoClassification.
from_pretrained(OUT)` loads, our class names as its `id2label`; divided and
joint attention only (see `checkpoints.export`).
`--to=pyth`: OUT is the original TimeSformer's `.pyth`
(`{'model_state', 'epoch', 'cfg'}`, a `torch.save` file); also space_only.

OUT is written only once complete. Neither format needs torch installed.
Both record the channel order the model takes (`data.channel_order`: BGR
for the original's SSv2 models, RGB otherwise; see `checkpoints.export`),
and a line says which pixels to give it.
"""

from __future__ import annotations

import pickle

from absl import flags

from tsformer_jax import cli
from tsformer_jax.checkpoints import export

WRITERS = {'hf': export.write_hf, 'pyth': export.write_pyth}

_TO = flags.DEFINE_enum('to', 'hf', list(WRITERS), 'Format of OUT: a '
                        'Hugging Face directory or the original\'s .pyth.')


@cli.takes(*cli.LOADING, cli.OVERWRITE)
def main(argv) -> int:
  if len(argv) != 3:
    raise cli.Error('Pass CHECKPOINT and OUT: python -m tsformer_jax.export '
                    'CHECKPOINT OUT --to=hf|pyth (--help shows more).')
  if cli.FORMAT.value in WRITERS:  # The spelling before --to.
    raise cli.Error(f'--format names the format of CHECKPOINT; to write '
                    f'{cli.FORMAT.value}, pass --to={cli.FORMAT.value}.')
  src, out = argv[1:]
  try:
    config, params = cli.load_checkpoint(src, 'export')
    path = WRITERS[_TO.value](out, config, params,
                              overwrite=cli.OVERWRITE.value)
  except (ValueError, OSError, pickle.UnpicklingError) as e:
    raise cli.Error(str(e), status=1) from e
  print(f'{src} -> {path} ({_TO.value}): {cli.describe(config, params)}.')
  print(export.pixels_note(config))
  return 0


if __name__ == '__main__':
  cli.run(main)
