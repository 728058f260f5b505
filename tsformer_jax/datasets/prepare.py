r"""Prepare a dataset as TFDS (ArrayRecord of encoded frames) for training.

  python -m tsformer_jax.datasets.prepare --config=configs/divided.py:ssv2 \
      --config.dataset.data_dir=/data/ssv2 --out=/data/tfds [--short_side=320]
  python -m tsformer_jax.datasets.prepare --config=configs/divided.py:demo

writes the train and eval splits of the config's dataset to
`OUT/encoded_videos/ssv2/1.0.0` (`OUT/synthetic_motion/1.0.0` for the demo);
`--out` defaults to `config.dataset.tfds_dir`, else
`~/.cache/tsformer_jax/tfds`. Train on it with
`--config.dataset.format=tfds --config.dataset.tfds_dir=OUT`.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tsformer_jax.datasets import tfds_builders

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Job config: its dataset section picks the dataset.',
    lock_config=True)
_OUT = flags.DEFINE_string(
    'out', None, 'TFDS folder; default config.dataset.tfds_dir, else '
    '~/.cache/tsformer_jax/tfds.')
_SPLITS = flags.DEFINE_list(
    'splits', None, 'Splits to write; default the config\'s train_split and '
    'eval_split.')
_SHORT_SIDE = flags.DEFINE_integer(
    'short_side', 320, 'Shrink frames to this short side (aspect kept) where '
    'larger; 0 keeps their size.')
_FPS = flags.DEFINE_float(
    'fps', 0.0, 'Subsample frames to this rate where faster; 0 keeps all.')
_JPEG_QUALITY = flags.DEFINE_integer('jpeg_quality', 90,
                                     'JPEG quality, 1 to 95.')
_LIMIT = flags.DEFINE_integer(
    'limit', None, 'At most this many videos per split (a quick trial).')
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', os.cpu_count() or 1, 'Threads decoding and encoding.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  directory = tfds_builders.prepare(
      _CONFIG.value, _OUT.value, splits=_SPLITS.value,
      short_side=_SHORT_SIDE.value, fps=_FPS.value,
      jpeg_quality=_JPEG_QUALITY.value, limit=_LIMIT.value,
      num_workers=_NUM_WORKERS.value)
  logging.info('Prepared %s in %s.', _CONFIG.value.dataset.name, directory)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
