"""What the command-line entry points share.

Every entry point is an absl program. absl keeps flags in one registry in
which two modules may not define the same name, so the flags that several
entry points take are defined here, once. `run` ends an expected failure
(`Error`: a missing file, a bad value) with one line on stderr instead of a
traceback; `call` runs an entry point within this process, as the shell
would (tests, notebooks). Only entry points import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import functools
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The job config: a file of configs/ and its arg, e.g. '
    'configs/divided.py:hr,ssv2; override fields with '
    '--config.model.dtype=bfloat16.', lock_config=True)
CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'A checkpoint of any format '
    'tsformer_jax.load_checkpoint reads, e.g. a training workdir\'s '
    'checkpoints/ (its latest step).')
OUT = flags.DEFINE_string('out', None, 'Where the output goes.')
JSON = flags.DEFINE_bool('json', False, 'Print one JSON document.')
# convert reads SRC in a checkpoint format, export writes OUT in one; each
# checks the value (absl lets one module alone define a flag name).
FORMAT = flags.DEFINE_string(
    'format', None, 'Checkpoint format: of SRC for convert (auto, the '
    'default, or one of checkpoints.FORMATS), of OUT for export (hf, the '
    'default, or pyth).')
OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing OUT.')

Main = Callable[[list[str]], int | None]


class Error(Exception):
  """An expected failure, reported as one line `PROGRAM: error: message`.

  Attributes:
    status: the exit status.
  """

  def __init__(self, message: str, status: int = 2):
    super().__init__(message)
    self.status = status


def run(main: Main):
  """`app.run(main)`, where an `Error` ends the program in one line."""
  app.run(_reporting_errors(main))


def call(main: Main, argv: Sequence[str]) -> int:
  """Runs `main` as `run` does, with `argv` as the command line, within
  this process; returns the exit status.

  Flags are parsed afresh from `argv`: those it does not set take their
  defaults, whatever an earlier call set.
  """
  values = flags.FLAGS
  values.unparse_flags()
  # config_flags defines an override flag (--config.model.depth) for each
  # override it finds in sys.argv; the last call's go first.
  for name in [n for n in values if n.startswith(f'{CONFIG.name}.')]:
    delattr(values, name)
  argv_before, sys.argv = sys.argv, list(argv)
  try:
    rest = values(list(argv))
  except (flags.Error, app.UsageError) as e:
    print(f'{_program(argv)}: error: {e}', file=sys.stderr)
    return 2
  finally:
    sys.argv = argv_before
  try:
    return _reporting_errors(main)(rest) or 0
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 1


def _reporting_errors(main: Main) -> Main:
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except Error as e:
      print(f'{_program(argv)}: error: {e}', file=sys.stderr)
      sys.exit(e.status)
  return wrapped


def _program(argv: Sequence[str]) -> str:
  """'predict' for .../tsformer_jax/predict.py."""
  return os.path.splitext(os.path.basename(argv[0]))[0]
