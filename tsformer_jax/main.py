r"""Train and evaluate TimeSformer.

  python -m tsformer_jax.main --config=configs/divided.py:demo --workdir=DIR
  python -m tsformer_jax.main --config=configs/divided.py \
      --config.data.data_dir=/data/k400 --workdir=DIR --mode=eval

Running the same command again resumes from the last checkpoint in DIR
that restores (a damaged newer one is moved aside, with a warning).
Expected problems (missing data, a bad config value, an unreadable
checkpoint, a loss gone NaN with config.on_nonfinite='stop') end the job
with one line `main: error: ...` and exit status 2.

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

_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, summaries and '
                               'results.json go here.')

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


@cli.takes(cli.CONFIG, cli.MODE)
def main(argv):
  if len(argv) > 1 or cli.CONFIG.value is None or not _WORKDIR.value:
    raise cli.Error('Pass --config=configs/<scheme>.py[:arg] and '
                    f'--workdir=DIR, and no other arguments (got {argv[1:]}); '
                    '--help shows more.')
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value, auto=_DISTRIBUTED.value)
  # Imported here: loader worker processes import this module again, and
  # train's clu writers would load TensorFlow into each of them.
  from tsformer_jax import train  # pylint: disable=g-import-not-at-top
  # Missing data, a bad config value, an unreadable checkpoint, a loss gone
  # NaN: one line. Anything else is a bug and keeps its traceback.
  with cli.expected_as_error():
    results = train.train_and_evaluate(cli.CONFIG.value, _WORKDIR.value,
                                       cli.MODE.value)
  logging.info('Results: %s', results)


if __name__ == '__main__':
  cli.run(main)
