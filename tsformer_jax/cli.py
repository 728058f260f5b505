"""What the command-line entry points share.

Every entry point is an absl program. absl keeps flags in one registry in
which two modules may not define the same name, so the flags that several
entry points take are defined here, once, each with one meaning; each entry
point declares those it reads (`takes`), and the others are refused rather
than ignored. `load_checkpoint` reads a checkpoint as the loading flags
(`LOADING`) ask. `run` ends an expected failure (`Error`: a missing file, a
bad value) with one line on stderr instead of a traceback, and `expected`
tells such a failure from a bug; `call` runs an entry point within this
process, as the shell would (tests, notebooks).
Only entry points import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
import difflib
import functools
import importlib.util
import logging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging as absl_logging
import clu
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from tsformer_jax import checkpoints
from tsformer_jax import config_lib

# TensorFlow's C++ INFO lines, in this process and every loader worker it
# starts; set before anything imports TensorFlow. Its oneDNN notice is
# printed before the level applies, and only while oneDNN's ops are on:
# TensorFlow only writes summaries and reads records here, none of its math.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

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
OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing OUT.')
MODE = flags.DEFINE_enum('mode', 'train_and_eval',
                         ['train', 'eval', 'train_and_eval'],
                         'What the job runs: train, eval (the checkpoint in '
                         '--workdir) or both.')

# How a checkpoint is read and fitted to --config (convert, export).
FORMAT = flags.DEFINE_string(
    'format', 'auto', 'Format of the checkpoint read: auto (from its files) '
    'or one of checkpoints.FORMATS.')
NUM_CLASSES = flags.DEFINE_integer('num_classes', None,
                                   'Overrides the class count.')
POS_RESIZE = flags.DEFINE_enum(
    'pos_resize', '2d', list(checkpoints.POS_RESIZE_MODES),
    "Position embedding resampling: 2d grid or the original's 1d sequence "
    '(both nearest).')
ADAPT = flags.DEFINE_bool(
    'adapt', False, 'Fit a video checkpoint to --config where it differs: '
    'resample its embeddings, inflate its scheme, draw a new head. Without '
    'it such a conversion stops and names the changes.')
CLASS_NAMES = flags.DEFINE_string(
    'class_names', None, 'A text file of class names, one per line in class '
    'order, for a checkpoint that does not carry its own (an original '
    '.pyth).')
LOADING = (CONFIG, FORMAT, NUM_CLASSES, POS_RESIZE, ADAPT, CLASS_NAMES)
# Labels of listings (features, probe): the class names they index.
CLASSES = flags.DEFINE_string(
    'classes', None, 'A text file of class names, one per line, that the '
    'listings\' labels name (default: classes.txt beside the listing).')

SHARED = (CONFIG, CHECKPOINT, OUT, JSON, FORMAT, OVERWRITE, MODE, NUM_CLASSES,
          POS_RESIZE, ADAPT, CLASS_NAMES, CLASSES)

Main = Callable[[list[str]], int | None]


def takes(*shared: flags.FlagHolder) -> Callable[[Main], Main]:
  """Declares the flags of `SHARED` that an entry point's `main` reads.

  `run` and `call` refuse any other of them given on the command line: the
  registry is shared, so the tool would otherwise accept and ignore it
  (`predict --out=x.npz`, where `--features_out` was meant). `--help` lists
  them with the entry point's own flags.
  """
  def declare(main: Main) -> Main:
    main.shared_flags = tuple(holder.name for holder in shared)
    # absl files a script's own flags under its path, not '__main__'.
    module = sys.argv[0] if main.__module__ == '__main__' else main.__module__
    for holder in shared:
      flags.FLAGS.register_key_flag_for_module(module,
                                               flags.FLAGS[holder.name])
    return main
  return declare


class Error(Exception):
  """An expected failure, reported as one line `PROGRAM: error: message`.

  Attributes:
    status: the exit status.
  """

  def __init__(self, message: str, status: int = 2):
    super().__init__(message)
    self.status = status


# A missing or unwritable file: the job's surroundings, not its code.
_EXPECTED_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError,
                       IsADirectoryError, PermissionError)
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def expected(error: BaseException) -> bool:
  """Whether `error` is an expected problem, for one line and exit status 2
  rather than a traceback: a missing, existing or unwritable file, or a
  `ValueError` or `ArithmeticError` that a `raise` statement of this package
  raised on purpose (a bad config value, missing data, a damaged checkpoint,
  a diverged loss). The same types raised anywhere else (JAX's shape
  checks, `int('x')`, a library's own complaint) are a bug's symptoms and
  keep their traceback.
  """
  if isinstance(error, _EXPECTED_OS_ERRORS):
    return True
  if not isinstance(error, (ValueError, ArithmeticError)):
    return False
  trace = error.__traceback__
  if type(error.__cause__).__name__ == 'UnfilteredStackTrace':
    trace = error.__cause__.__traceback__  # JAX hid its own frames.
  frames = traceback.extract_tb(trace)
  return bool(frames) and frames[-1].filename.startswith(_PACKAGE) and (
      frames[-1].line or '').startswith('raise ')


@contextlib.contextmanager
def expected_as_error() -> Iterator[None]:
  """Turns an expected problem raised inside (see `expected`) into an
  `Error` (one line, exit status 2); a bug keeps its traceback."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if expected(e):
      raise Error(str(e)) from e
    raise


def run(main: Main):
  """`app.run(main)`, where an `Error` or a flag that does not parse (exit
  status 2) ends the program in one line, and the libraries' INFO lines
  show only with --verbosity=1 or more."""
  app.run(_quiet_libraries(_reporting_errors(main)), flags_parser=_parse_flags)


# Where the INFO lines worth showing come from: this package (progress,
# where checkpoints go) and clu (metric lines, steps/s and ETA).
_SHOWN = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
               for m in (sys.modules['tsformer_jax'], clu))


class _LibraryChatter(logging.Filter):
  """Drops other libraries' (orbax, jax, tfds) records below WARNING."""

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.WARNING or
            os.path.abspath(record.pathname).startswith(_SHOWN))


def _quiet_libraries(main: Main) -> Main:
  @functools.wraps(main)
  def wrapped(argv):
    if absl_logging.get_verbosity() < absl_logging.DEBUG:
      absl_logging.get_absl_handler().addFilter(_LibraryChatter())
    return main(argv)
  return wrapped


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError) as e:
    print(f'{_program(argv)}: error: {_flag_error(e, argv)}',
          file=sys.stderr)
    sys.exit(2)


def _flag_error(error: Exception, argv: Sequence[str]) -> str:
  """A flag's error; for a config file's own ValueError, which config_flags
  reports with its traceback, the flag and that error's line; for an
  override of a field the config lacks (config_flags' KeyError or
  AttributeError), the field and the closest valid ones."""
  if isinstance(error, (KeyError, AttributeError)):
    unknown = unknown_config_field(argv)
    if unknown is None:
      raise error
    return unknown
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if 'Traceback (most recent call last):' in lines and lines[-1].startswith(
      'ValueError: '):
    return f'{lines[0]} {lines[-1][len("ValueError: "):]}'
  return str(error)


def unknown_config_field(argv: Sequence[str]) -> str | None:
  """"unknown config field 'dataset' (did you mean 'data'?)" for the first
  `--config.a.b=...` override in `argv` whose path the config (`--config`'s
  file and arg) lacks; None if every override names a field, or the config
  itself does not load."""
  try:
    config = _load_config(argv)
  except Exception:  # pylint: disable=broad-except
    return None  # Its own error is config_flags' to report.
  prefix = f'--{CONFIG.name}.'
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    node = config
    for key in arg[len(prefix):].split('=', 1)[0].split('.'):
      if not isinstance(node, ml_collections.ConfigDict):
        break
      if key not in node:
        close = difflib.get_close_matches(key, list(node), n=3, cutoff=0.5)
        hint = (' (did you mean ' + ' or '.join(f"'{c}'" for c in close) +
                '?)' if close else f'; valid: {sorted(node)}')
        return f"unknown config field '{key}'{hint}"
      node = node[key]
  return None


def _load_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """The config `--config=FILE[:ARG]` in `argv` names, loaded as
  config_flags loads it (the file's `get_config(ARG)`)."""
  flag = f'--{CONFIG.name}'
  argv = list(argv)
  value = next(a[len(flag) + 1:] if a != flag else argv[i + 1]
               for i, a in enumerate(argv)
               if a.startswith(flag + '=') or a == flag)
  path, _, arg = value.partition(':')
  spec = importlib.util.spec_from_file_location('_config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def call(main: Main, argv: Sequence[str]) -> int:
  """Runs `main` as `run` does, with `argv` as the command line, within
  this process; returns the exit status.

  Flags are parsed afresh from `argv`: those it does not set take their
  defaults, whatever an earlier call set.
  """
  with _logging_restored():
    return _call(main, argv)


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
  """Puts back after an in-process run what a run changes of logging: the
  package logger's handlers, level and propagation (convert's adaptation
  lines) and the filters of absl's handler, so that nothing a call did
  outlives it (a handler left on a closed stream, records kept from
  propagating)."""
  logger = logging.getLogger('tsformer_jax')
  absl_handler = absl_logging.get_absl_handler()
  saved = (list(logger.handlers), logger.level, logger.propagate,
           list(absl_handler.filters))
  try:
    yield
  finally:
    handlers, level, propagate, filters = saved
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate
    absl_handler.filters[:] = filters


def _call(main: Main, argv: Sequence[str]) -> int:
  values = flags.FLAGS
  values.unparse_flags()
  # config_flags defines an override flag (--config.model.depth) for each
  # override it finds in sys.argv; the last call's go first.
  for name in [n for n in values if n.startswith(f'{CONFIG.name}.')]:
    delattr(values, name)
  argv_before, sys.argv = sys.argv, list(argv)
  try:
    rest = values(list(argv))
  except (flags.Error, app.UsageError, KeyError, AttributeError) as e:
    print(f'{_program(argv)}: error: {_flag_error(e, argv)}',
          file=sys.stderr)
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
      _refuse_shared_flags_not_taken(main, argv)
      return main(argv)
    except Error as e:
      print(f'{_program(argv)}: error: {e}', file=sys.stderr)
      sys.exit(e.status)
  return wrapped


def _refuse_shared_flags_not_taken(main: Main, argv: Sequence[str]):
  """Raises an `Error` naming the flags of `SHARED` given on the command
  line that `main` does not take (see `takes`)."""
  taken = getattr(main, 'shared_flags', ())
  # An override such as --config.model.depth=2 is a flag of its own.
  given = {name.split('.')[0] for name in flags.FLAGS
           if flags.FLAGS[name].present}
  refused = [f'--{holder.name}' for holder in SHARED
             if holder.name in given and holder.name not in taken]
  if refused:
    program = _program(argv)
    verb = 'is not a flag' if len(refused) == 1 else 'are not flags'
    listed = ''.join(f'--{name}, ' for name in taken)
    raise Error(f'{", ".join(refused)} {verb} of {program} (it takes: '
                f'{listed}and those {program} --help lists).')


def load_checkpoint(src: str, program: str):
  """`(config, params)` of SRC as the loading flags ask (`LOADING`), each
  change printed as 'PROGRAM: ...': fitted to --config (where a video
  checkpoint differs, only with --adapt), --num_classes, --pos_resize,
  --class_names.

  Raises:
    ValueError: SRC does not fit --config without changes --adapt allows.
  """
  _log_adaptations(program)
  config, params = checkpoints.load_checkpoint(
      src, CONFIG.value, format=FORMAT.value, num_classes=NUM_CLASSES.value,
      pos_resize=POS_RESIZE.value, fit=ADAPT.value)
  if CLASS_NAMES.value:
    config = config_lib.with_class_names(config,
                                         _read_names(CLASS_NAMES.value))
  return config, params


def _read_names(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def _log_adaptations(program: str):
  """Prints what `checkpoints` changes in the weights (not orbax's logs)."""
  logger = logging.getLogger('tsformer_jax')
  handler = next((h for h in logger.handlers if h.get_name() == 'adaptations'),
                 None)
  if handler is None:
    handler = logging.StreamHandler()
    handler.set_name('adaptations')
    logger.addHandler(handler)
    logger.propagate = False
  handler.setFormatter(logging.Formatter(f'{program}: %(message)s'))
  # The current stderr (an in-process run may have swapped it); the last
  # one may be closed, so no flush as setStream would.
  handler.stream = sys.stderr
  logger.setLevel(logging.INFO)


def describe(config, params) -> str:
  """'divided, 8 x (224, 224), 400 classes, 121,260,688 parameters'."""
  m = config.model
  count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  return (f'{m.attention}, {m.num_frames} x {tuple(m.image_size)}, '
          f'{m.num_classes} classes, {count:,} parameters')


def _program(argv: Sequence[str]) -> str:
  """'predict' for .../tsformer_jax/predict.py."""
  return os.path.splitext(os.path.basename(argv[0]))[0]
