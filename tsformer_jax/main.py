r"""Train and evaluate TimeSformer.

  python -m tsformer_jax.main --config=configs/divided.py:demo --workdir=DIR
  python -m tsformer_jax.main --config=configs/divided.py \
      --config.data.data_dir=/data/k400 --workdir=DIR --mode=eval

Running the same command again resumes from the last checkpoint in DIR.

Multi-process (one process per host, or several on one machine):

  python -m tsformer_jax.main ... --coordinator_address=HOST0:PORT \
      --num_processes=N --process_id=I

or the environment variables TSFORMER_COORDINATOR, TSFORMER_NUM_PROCESSES
and TSFORMER_PROCESS_ID; on Cloud TPU pods and SLURM, `--distributed` lets
JAX find its peers itself.
"""

from absl import flags
from absl import logging

from tsformer_jax import cli
from tsformer_jax import sharding
from tsformer_jax import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, summaries and '
                               'results.json go here.')
_MODE = flags.DEFINE_enum('mode', 'train_and_eval',
                          ['train', 'eval', 'train_and_eval'], 'What to run.')

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 in a multi-process '
    f'job (or ${sharding.COORDINATOR_ENV}).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in the job (or '
    f'${sharding.NUM_PROCESSES_ENV}).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, f'This process (or ${sharding.PROCESS_ID_ENV}).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() and let it '
    'find the cluster (Cloud TPU pods, SLURM).')


def main(argv):
  if len(argv) > 1 or cli.CONFIG.value is None or not _WORKDIR.value:
    raise cli.Error('Pass --config=configs/<scheme>.py[:arg] and '
                    f'--workdir=DIR, and no other arguments (got {argv[1:]}); '
                    '--help shows more.')
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value, auto=_DISTRIBUTED.value)
  results = train.train_and_evaluate(cli.CONFIG.value, _WORKDIR.value,
                                     _MODE.value)
  logging.info('Results: %s', results)


if __name__ == '__main__':
  cli.run(main)
