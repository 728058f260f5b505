r"""Exports a checkpoint for PyTorch: Hugging Face or the original's `.pyth`.

  python -m tsformer_jax.export CHECKPOINT OUT [--format=hf|pyth]
      [--config=configs/divided.py:base --adapt] [--num_classes=N]
      [--class_names=FILE] [--overwrite]

CHECKPOINT: anything `tsformer_jax.load_checkpoint` reads, loaded by
`convert.load` with `convert`'s flags: with `--config`, a video checkpoint
that does not fit it is refused, naming what would change, unless `--adapt`
asks for the change; every change is printed.

`--format=hf` (default): OUT is a directory (`config.json`,
`model.safetensors`) that `transformers.TimesformerForVideoClassification.
from_pretrained(OUT)` loads, our class names as its `id2label`; divided and
joint attention only (see `checkpoints.export`).
`--format=pyth`: OUT is the original TimeSformer's `.pyth`
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
from tsformer_jax import convert
from tsformer_jax.checkpoints import export

# CHECKPOINT is read as convert reads SRC, with its flags (in --help too).
flags.adopt_module_key_flags(convert)

WRITERS = {'hf': export.write_hf, 'pyth': export.write_pyth}


@cli.takes(cli.CONFIG, cli.FORMAT, cli.OVERWRITE)
def main(argv) -> int:
  if len(argv) != 3:
    raise cli.Error('Pass CHECKPOINT and OUT: python -m tsformer_jax.export '
                    'CHECKPOINT OUT --format=hf|pyth (--help shows more).')
  src, out = argv[1:]
  fmt = cli.FORMAT.value or 'hf'
  if fmt not in WRITERS:
    raise cli.Error(f'--format={fmt}: export writes {" or ".join(WRITERS)}.')
  try:
    config, params = convert.load(src, 'export')
    path = WRITERS[fmt](out, config, params, overwrite=cli.OVERWRITE.value)
  except (ValueError, OSError, pickle.UnpicklingError) as e:
    raise cli.Error(str(e), status=1) from e
  print(f'{src} -> {path} ({fmt}): {cli.describe(config, params)}.')
  print(export.pixels_note(config))
  return 0


if __name__ == '__main__':
  cli.run(main)
