r"""Prepare a dataset as TFDS (ArrayRecord of encoded frames) for training.

  python -m tsformer_jax.datasets.prepare --config=configs/divided.py:ssv2 \
      --config.data.data_dir=/data/ssv2 --out=/data/tfds [--short_side=320]
  python -m tsformer_jax.datasets.prepare --config=configs/divided.py:demo

writes the train and eval splits of the config's dataset to
`OUT/encoded_videos/ssv2/2.0.0` (`OUT/synthetic_motion/2.0.0` for the demo);
`--out`, the TFDS folder, defaults to `config.data.tfds_dir`, else
`~/.cache/tsformer_jax/tfds`. Train on it with
`--config.data.format=tfds --config.data.tfds_dir=OUT`.

`--short_side=256` stores Kinetics as the original trained on it: its
`DATASET.md` resizes every video to a short side of 256 first, and training
then enlarges the frames to the drawn scale (256-320). The default, 320,
keeps more of larger videos, which training then shrinks (the original's
resize does not antialias).
"""

import os

from absl import flags
from absl import logging

from tsformer_jax import cli
from tsformer_jax.datasets import tfds_builders

_SPLITS = flags.DEFINE_list(
    'splits', None, 'Splits to write; default the config\'s train_split and '
    'eval_split.')
_SHORT_SIDE = flags.DEFINE_integer(
    'short_side', None,
    'Shrink frames to this short side (aspect kept) where larger; 0 keeps '
    f'their size. Default: {tfds_builders.DEFAULT_SHORT_SIDE}, or the '
    'config\'s largest training scale where larger (hr: 512). '
    f'{tfds_builders.ORIGINAL_SHORT_SIDE}: the original\'s Kinetics copies.',
    lower_bound=0)
_FPS = flags.DEFINE_float(
    'fps', tfds_builders.DEFAULT_FPS,
    'Subsample frames to this rate where faster; 0 keeps all.',
    lower_bound=0.0)
_JPEG_QUALITY = flags.DEFINE_integer(
    'jpeg_quality', tfds_builders.DEFAULT_JPEG_QUALITY,
    'JPEG quality, 1 to 95.', lower_bound=1, upper_bound=95)
_LIMIT = flags.DEFINE_integer(
    'limit', None, 'At most this many videos per split (a quick trial).',
    lower_bound=1)
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', os.cpu_count() or 1, 'Threads decoding and encoding.',
    lower_bound=1)


@cli.takes(cli.CONFIG, cli.OUT)
def main(argv):
  if len(argv) > 1 or cli.CONFIG.value is None:
    raise cli.Error('Pass --config=configs/<scheme>.py[:arg] and no other '
                    f'arguments (got {argv[1:]}); --help shows more.')
  with cli.expected_as_error():  # Missing data, a bad config value.
    directory = tfds_builders.prepare(
        cli.CONFIG.value, cli.OUT.value, splits=_SPLITS.value,
        short_side=_SHORT_SIDE.value, fps=_FPS.value,
        jpeg_quality=_JPEG_QUALITY.value, limit=_LIMIT.value,
        num_workers=_NUM_WORKERS.value)
  logging.info('Prepared %s in %s.', cli.CONFIG.value.data.dataset, directory)


if __name__ == '__main__':
  cli.run(main)
