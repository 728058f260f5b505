r"""Train and evaluate TimeSformer.

  python -m tsformer_jax.main --config=configs/divided.py:demo --workdir=DIR
  python -m tsformer_jax.main --config=configs/divided.py \
      --config.dataset.data_dir=/data/k400 --workdir=DIR --mode=eval

Running the same command again resumes from the last checkpoint in DIR.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tsformer_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Job config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, summaries and '
                               'results.json go here.')
_MODE = flags.DEFINE_enum('mode', 'train_and_eval',
                          ['train', 'eval', 'train_and_eval'], 'What to run.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                     _MODE.value)
  logging.info('Results: %s', results)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
