"""What long training jobs survive: damaged checkpoints, a loss gone NaN,
and user errors that end in one line rather than a traceback."""

import contextlib
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import convert
from tsformer_jax import evaluation
from tsformer_jax import export
from tsformer_jax import main
from tsformer_jax import predict
from tsformer_jax import train
from tsformer_jax import visualize
from tsformer_jax.checkpoints.training import CheckpointError
from tsformer_jax.datasets import video_writer

ROOT = pathlib.Path(__file__).parent.parent


def _tiny_config():
  config = config_lib.get_config('divided', 'tiny')
  config.model.depth = 1
  return config


@pytest.fixture(scope='module')
def state():
  """A tiny train state (SGD with momentum), as arrays."""
  return jax.tree.map(jnp.asarray, train.create_train_state(
      _tiny_config(), jax.random.key(0), 10))


def _at(state, step):
  """`state` at `step`, its params and momentum offset by `step`, so that
  each saved step holds values of its own."""
  shift = lambda tree: jax.tree.map(lambda x: x + step, tree)
  return state.replace(step=jnp.asarray(step, jnp.int32),
                       params=shift(state.params),
                       opt_state=shift(state.opt_state))


def _saved_run(workdir, state, steps=(2, 4, 6), config=None):
  """`workdir/checkpoints` holding `_at(state, s)` for each of `steps`."""
  config = config or _tiny_config()
  manager = checkpoints.training.checkpoint_manager(workdir, config)
  for step in steps:
    checkpoints.training.save(manager, _at(state, step), config)
  manager.wait_until_finished()
  return pathlib.Path(workdir) / 'checkpoints'


def _data_files(step):
  """The files of a step's array data (OCDBT), largest first."""
  return sorted(step.glob('state/**/d/*'), key=lambda p: -p.stat().st_size)


def _truncate_all(step):
  for path in _data_files(step):
    os.truncate(path, 100)


def _garble(path):
  with open(path, 'r+b') as f:
    f.write(b'\xff' * 1000)


# Every array file truncated: the first array read (of the metadata or the
# values) fails.
_UNREADABLE = r'state/( metadata)?: cannot read array \S+: '


def _empty(step):
  shutil.rmtree(step)
  step.mkdir()


# Damage done to a step after orbax committed it, and the reason the
# warning or error gives.
DAMAGE = {
    'truncated array file': (lambda s: os.truncate(_data_files(s)[0], 100),
                             r'state/: cannot read array \S+: .*size 100'),
    'deleted array file': (lambda s: _data_files(s)[0].unlink(),
                           r'state/: cannot read array \S+: '),
    'garbage in an array file': (lambda s: _garble(_data_files(s)[0]),
                                 r'state/: cannot read array \S+: '),
    'deleted state metadata': (
        lambda s: (s / 'state' / '_METADATA').unlink(),
        r'state/ metadata: Metadata file \(named _METADATA\) does not exist'),
    'garbage state metadata': (
        lambda s: (s / 'state' / '_METADATA').write_text('{garbage'),
        r'state/ metadata: JSONDecodeError: Expecting property name'),
    'deleted config metadata': (
        lambda s: (s / 'config' / 'metadata').unlink(),
        r'config/: File \S+/6/config/metadata not found'),
    'deleted state item': (lambda s: shutil.rmtree(s / 'state'),
                           r'state/ is missing'),
    'empty step': (_empty, r'state/ is missing'),
}


@contextlib.contextmanager
def _warnings(name='tsformer_jax'):
  """The warnings logged under `name` (whatever its propagation)."""
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logger = logging.getLogger(name)
  logger.addHandler(handler)
  try:
    yield records
  finally:
    logger.removeHandler(handler)


def _files(directory):
  return sorted((str(p.relative_to(directory)), p.stat().st_size)
                for p in directory.rglob('*') if p.is_file())


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_dropped(new, old):
  """`new`'s params and optimizer moments are `old`'s; its optimizer step
  counts (the schedule's) are `new.step`, not `old.step`."""
  floats = lambda s: [x for x in jax.tree.leaves((s.params, s.opt_state))
                      if np.issubdtype(x.dtype, np.floating)]
  _assert_same(floats(new), floats(old))
  counts = [x for x in jax.tree.leaves(new.opt_state)
            if np.issubdtype(x.dtype, np.integer)]
  assert counts and all(int(c) == int(new.step) for c in counts), counts


# ----------------------------------------------------------------------------
# 1. A damaged checkpoint


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_a_damaged_latest_step_is_set_aside_and_the_previous_restored(
    tmp_path, state, damage):
  directory = _saved_run(tmp_path, state)
  do, reason = DAMAGE[damage]
  do(directory / '6')
  damaged_files = _files(directory / '6')
  manager = checkpoints.training.checkpoint_manager(tmp_path, _tiny_config())
  with _warnings() as records:
    restored = checkpoints.training.restore_latest(manager, state)

  assert int(restored.step) == 4
  _assert_same((restored.params, restored.opt_state),
               (_at(state, 4).params, _at(state, 4).opt_state))
  # Kept for a post-mortem, as it was, out of orbax's sight.
  assert sorted(os.listdir(directory)) == ['2', '4', '6.damaged']
  assert _files(directory / '6.damaged') == damaged_files
  [warning] = [r.getMessage() for r in records]
  assert re.fullmatch(rf'Checkpoint step 6 is damaged \({reason}.*\): moved '
                      rf'to {directory}/6\.damaged; resuming from step 4\.',
                      warning), warning
  # Training writes step 6 again.
  checkpoints.training.save(manager, _at(state, 6), _tiny_config())
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 4, 6]


def test_a_step_without_orbax_step_metadata_still_restores(tmp_path, state):
  """`_CHECKPOINT_METADATA` holds orbax's bookkeeping, not the state: the
  step restores completely, so it is the one resumed."""
  directory = _saved_run(tmp_path, state)
  (directory / '6' / '_CHECKPOINT_METADATA').unlink()
  manager = checkpoints.training.checkpoint_manager(tmp_path, _tiny_config())
  restored = checkpoints.training.restore_latest(manager, state)
  assert int(restored.step) == 6
  _assert_same(restored.params, _at(state, 6).params)
  assert sorted(os.listdir(directory)) == ['2', '4', '6']


def test_a_step_holding_nan_is_damaged(tmp_path, state):
  directory = _saved_run(tmp_path, state, steps=(2, 4))
  manager = checkpoints.training.checkpoint_manager(tmp_path, _tiny_config())
  bad = _at(state, 6)
  bad = bad.replace(params={**bad.params, 'cls': bad.params['cls'] * jnp.nan})
  # Written past `training.save`, which refuses it (below).
  manager.save(6, args=ocp.args.Composite(
      state=ocp.args.StandardSave(dict(step=bad.step, params=bad.params,
                                       opt_state=bad.opt_state)),
      config=ocp.args.JsonSave(_tiny_config().to_dict())))
  manager.wait_until_finished()
  with _warnings() as records:
    restored = checkpoints.training.restore_latest(manager, state)
  assert int(restored.step) == 4
  assert sorted(os.listdir(directory)) == ['2', '4', '6.damaged']
  assert 'non-finite values (NaN or Inf) in params/cls' in \
      records[0].getMessage()


def test_no_step_restores_stops_naming_each_and_changes_nothing(tmp_path,
                                                                 state):
  directory = _saved_run(tmp_path, state)
  for step in ('2', '4', '6'):
    _truncate_all(directory / step)
  (directory / '4' / 'state' / '_METADATA').unlink()
  before = _files(directory)
  manager = checkpoints.training.checkpoint_manager(tmp_path, _tiny_config())
  with pytest.raises(CheckpointError) as error:
    checkpoints.training.restore_latest(manager, state)
  assert re.fullmatch(
      rf'No checkpoint in {directory} restores: step 6: {_UNREADABLE}.*; '
      r'step 4: state/ metadata: Metadata file \(named _METADATA\) does not '
      rf'exist at \S+; step 2: {_UNREADABLE}.*\. Nothing was changed on '
      r'disk; move the directory aside to start afresh\.', str(error.value)
  ), str(error.value)
  assert _files(directory) == before


def test_an_empty_checkpoint_directory_starts_afresh(tmp_path, state):
  """What a job killed before its first save leaves: no step."""
  manager = checkpoints.training.checkpoint_manager(tmp_path, _tiny_config())
  with _warnings() as records:
    assert checkpoints.training.restore_latest(manager, state) is state
  assert not records
  # Beside steps set aside (and the good ones deleted by hand), it says so.
  (tmp_path / 'checkpoints' / '6.damaged').mkdir()
  with _warnings() as records:
    assert checkpoints.training.restore_latest(manager, state) is state
  assert [r.getMessage() for r in records] == [
      f'No step to resume from in {tmp_path}/checkpoints (set aside: '
      '6.damaged); starting from step 0.']


def test_a_save_cut_short_leaves_no_step(tmp_path, state):
  """Orbax writes a step under a temporary name and renames it when whole;
  what a kill mid-save leaves is removed at the next start."""
  directory = _saved_run(tmp_path, state, steps=(2, 4))
  cut = directory / '6.orbax-checkpoint-tmp'
  (cut / 'state').mkdir(parents=True)
  (cut / 'state' / '_METADATA').write_text('{"tree_metadata": {')
  manager = checkpoints.training.checkpoint_manager(tmp_path, _tiny_config())
  assert int(checkpoints.training.restore_latest(manager, state).step) == 4
  assert sorted(os.listdir(directory)) == ['2', '4']


def test_save_refuses_non_finite_values(tmp_path, state):
  directory = _saved_run(tmp_path, state, steps=(2, 4))
  manager = checkpoints.training.checkpoint_manager(tmp_path, _tiny_config())
  bad = _at(state, 6)
  bad = bad.replace(opt_state=jax.tree.map(lambda x: x * jnp.inf,
                                           bad.opt_state))
  with pytest.raises(CheckpointError, match=(
      r'Step 6 not saved: non-finite values \(NaN or Inf\) in '
      rf'opt_state/\S+.*; the last checkpoint is step 4 in {directory}\.')):
    checkpoints.training.save(manager, bad, _tiny_config())
  manager.wait_until_finished()
  assert sorted(os.listdir(directory)) == ['2', '4']


def test_load_checkpoint_reads_the_newest_whole_step_or_says_why(tmp_path,
                                                                 state):
  directory = _saved_run(tmp_path, state)
  _truncate_all(directory / '6')
  # A training run's checkpoints/: the newest step that reads, warning.
  with _warnings() as records:
    _, params = checkpoints.load_checkpoint(directory)
  _assert_same(params, _at(state, 4).params)
  [warning] = [r.getMessage() for r in records]
  assert re.fullmatch(rf'{directory}: skipped damaged step 6: {_UNREADABLE}'
                      r'.*; read step 4 instead\.', warning), warning
  # A step asked for by name: that one, or an error.
  with pytest.raises(CheckpointError, match=(
      rf'^{directory}/6: damaged checkpoint: {_UNREADABLE}[^\n]*\.$')):
    checkpoints.load_checkpoint(directory / '6')
  for step in ('2', '4'):
    _truncate_all(directory / step)
  with pytest.raises(CheckpointError, match=(
      rf'^{directory}: no step can be read: step 6: {_UNREADABLE}.*; step 4: '
      rf'{_UNREADABLE}.*; step 2: {_UNREADABLE}[^\n]*\.$')):
    checkpoints.load_checkpoint(directory)
  # Steps that lost every item are still this run's steps.
  shutil.rmtree(directory)
  directory.mkdir()
  (directory / '8').mkdir()
  with pytest.raises(CheckpointError, match=(
      r'no step can be read: step 8: has no config/ with a params/ or '
      r'state/ item\.$')):
    checkpoints.load_checkpoint(directory)


@pytest.mark.parametrize('program', ['predict', 'visualize', 'convert',
                                     'export'])
def test_clis_on_a_damaged_checkpoint_end_in_one_line(tmp_path, state,
                                                      capsys, program):
  directory = _saved_run(tmp_path, state, steps=(2, 4))
  for step in ('2', '4'):
    _truncate_all(directory / step)
  video = tmp_path / 'clip.mp4'
  video_writer.write_mp4(str(video), np.zeros((8, 32, 32, 3), np.uint8), 30.0)
  mains = dict(predict=predict.main, visualize=visualize.main,
               convert=convert.main, export=export.main)
  args = dict(predict=[f'--checkpoint={directory}', str(video)],
              visualize=[f'--checkpoint={directory}',
                         f'--out={tmp_path}/out', str(video)],
              convert=[str(directory), str(tmp_path / 'out')],
              export=[str(directory), str(tmp_path / 'out')])[program]
  status = cli.call(mains[program], [program, *args])
  lines = capsys.readouterr().err.strip().splitlines()
  assert status == 1  # These CLIs' status for a checkpoint they cannot read.
  assert len(lines) == 1, lines
  assert re.match(rf'{program}: error: {directory}: no step can be read: '
                  rf'step 4: {_UNREADABLE}', lines[0]), lines[0]
  assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------
# 2. A loss that turns NaN or Inf


def _poison_at(monkeypatch, k):
  """Makes the logits, hence the loss and gradients, of update `k` (the
  step that takes `state.step` from k - 1 to k) NaN, inside the jitted
  step: deterministic whatever the data."""
  original = train.train_step

  def poisoned(state, batch, rng, **kwargs):
    step = state.step

    def apply_fn(variables, clips, **kw):
      logits = state.apply_fn(variables, clips, **kw)
      return jnp.where(step == k - 1, jnp.nan, logits)

    new, metrics = original(state.replace(apply_fn=apply_fn), batch, rng,
                            **kwargs)
    return new.replace(apply_fn=state.apply_fn), metrics

  monkeypatch.setattr(train, 'train_step', poisoned)


@pytest.mark.parametrize('policy', [
    pytest.param('stop', marks=pytest.mark.slow), 'skip'])  # Fast tier: 1.
def test_the_step_flags_a_nonfinite_update_and_skip_drops_it(
    monkeypatch, state, policy):
  config = _tiny_config()
  config.on_nonfinite = policy
  config.model.drop_path = 0.0
  config.grad_accum_steps = 1
  _poison_at(monkeypatch, 8)
  rng = np.random.default_rng(0)
  batch = dict(clips=rng.normal(size=(2, 4, 32, 32, 3)).astype(np.float32),
               labels=np.array([1, 2], np.int32))
  step = jax.jit(functools.partial(
      train.train_step, config=config,
      schedule=train.learning_rate_schedule(config, 10)))
  at = _at(state, 6)
  good, metrics = step(at, batch, jax.random.key(1))
  assert not bool(metrics['nonfinite']) and int(good.step) == 7
  bad, metrics = step(good, batch, jax.random.key(1))
  assert bool(metrics['nonfinite']) and np.isnan(float(metrics['loss']))
  assert int(bad.step) == 8  # The step advances either way.
  if policy == 'skip':  # Dropped: params and moments unchanged.
    _assert_dropped(bad, good)  # The schedule's count is 8, as the step.
  else:
    assert np.isnan(np.asarray(bad.params['cls'])).all()


def test_an_unknown_on_nonfinite_lists_the_valid_ones():
  config = config_lib.get_config('divided', 'demo')
  config.on_nonfinite = 'ignore'
  with pytest.raises(ValueError, match=r"Unknown config.on_nonfinite "
                     r"'ignore'; valid: \['skip', 'stop'\]\."):
    train.train_and_evaluate(config, '/nonexistent')


def _demo_config(**fields):
  config = config_lib.get_config('divided', 'demo')
  config.model.depth = 1
  config.batch_size = 8
  config.keep_checkpoints = 10
  config.update(fields)
  return config


class _Writer:
  """A metric writer that keeps the scalars in memory."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    for name, value in scalars.items():
      self.scalars.setdefault(name, {})[int(step)] = float(value)

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


def _sigterm_after(monkeypatch, k):
  """Sends this process SIGTERM once update `k` has run, as a preemption
  would."""
  original = train.jit_train_step

  def jit_train_step(*args, **kwargs):
    step_fn = original(*args, **kwargs)

    def step(state, batch, rng):
      number = int(state.step) + 1  # Read before the state is donated.
      result = step_fn(state, batch, rng)
      if number == k:
        os.kill(os.getpid(), signal.SIGTERM)
      return result
    return step

  monkeypatch.setattr(train, 'jit_train_step', jit_train_step)


@pytest.mark.slow
@pytest.mark.parametrize('found_when', ['logging', 'saving on SIGTERM'])
def test_a_nan_loss_stops_the_job_saving_nothing_after_it(
    tmp_path, monkeypatch, found_when):
  _poison_at(monkeypatch, 5)
  if found_when == 'logging':  # Step 6 logs (and saves): the check runs.
    config = _demo_config(num_train_steps=6, checkpoint_every_steps=2,
                          log_every_steps=3)
  else:  # Nothing logs before the save that SIGTERM asks for at step 5.
    _sigterm_after(monkeypatch, 5)
    config = _demo_config(num_train_steps=8, checkpoint_every_steps=2,
                          log_every_steps=100)
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, str(tmp_path), mode='train')
  assert str(error.value) == (
      "Step 5: the training loss is nan; stopped (config.on_nonfinite="
      "'stop'), saving nothing after it. The last good checkpoint is step 4"
      f" in {tmp_path}/checkpoints. Lower the learning rate, or set "
      '--config.on_nonfinite=skip to drop such updates.')
  assert cli.expected(error.value)  # main: this line, exit status 2.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert not (tmp_path / 'results.json').exists()
  _, params = checkpoints.load_checkpoint(tmp_path / 'checkpoints')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_skip_drops_a_nan_update_and_counts_it(tmp_path, monkeypatch):
  _poison_at(monkeypatch, 3)
  writer = _Writer()
  monkeypatch.setattr(train.metric_writers, 'create_default_writer',
                      lambda *args, **kwargs: writer)
  config = _demo_config(num_train_steps=4, checkpoint_every_steps=1,
                        log_every_steps=2, on_nonfinite='skip')
  results = train.train_and_evaluate(config, str(tmp_path), mode='train')

  assert results['step'] == 4 and results['skipped_updates'] == 1
  assert json.loads((tmp_path / 'results.json').read_text()) == results
  assert writer.scalars['train/skipped_updates'] == {2: 0, 4: 1}
  assert np.isfinite(writer.scalars['train/loss'][4])  # Step 4's alone.
  # Step 3 dropped its update: params and moments as at step 2.
  manager = checkpoints.training.checkpoint_manager(tmp_path, config)
  template = train.create_train_state(config, jax.random.key(0), 10)
  saved = {s: checkpoints.training.restore(manager, template, s)
           for s in (2, 3, 4)}
  _assert_dropped(saved[3], saved[2])
  assert not np.array_equal(saved[4].params['cls'], saved[3].params['cls'])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved[4]))


@pytest.mark.slow
def test_a_failing_evaluation_loses_no_training(tmp_path, monkeypatch):
  config = _demo_config(num_train_steps=2, checkpoint_every_steps=100,
                        log_every_steps=1)

  def out_of_memory(*args, **kwargs):
    raise RuntimeError('RESOURCE_EXHAUSTED while evaluating')

  with monkeypatch.context() as patch:
    patch.setattr(evaluation, 'evaluate', out_of_memory)
    with pytest.raises(RuntimeError, match='RESOURCE_EXHAUSTED'):
      train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == ['2']  # Saved regardless.
  # The same command resumes at the end and evaluates, training no step.
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 2 and results['train_loss'] is None
  assert 0 <= results['eval_top1'] <= 1


def test_an_evaluation_that_cannot_run_fails_before_training(tmp_path):
  config = _demo_config(num_train_steps=2)
  config.data.sampling = 'segments'
  config.data.test_clip_stride = 1.0
  with pytest.raises(ValueError, match='A clip stride needs sampling="rate"'):
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


# ----------------------------------------------------------------------------
# The damaged checkpoint in a whole run


def _run_config():
  return _demo_config(num_train_steps=6, checkpoint_every_steps=2,
                      log_every_steps=2)


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """The workdir of an uninterrupted 6-step run, saved every 2 steps."""
  workdir = tmp_path_factory.mktemp('straight')
  train.train_and_evaluate(_run_config(), str(workdir), mode='train')
  return workdir


def _assert_same_final_params(workdir, straight_run):
  _, want = checkpoints.load_checkpoint(straight_run / 'checkpoints')
  _, got = checkpoints.load_checkpoint(workdir / 'checkpoints')
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_a_run_resumed_past_a_damaged_step_reaches_the_same_parameters(
    tmp_path, straight_run):
  damaged = tmp_path / 'damaged'
  shutil.copytree(straight_run, damaged)
  _truncate_all(damaged / 'checkpoints' / '6')
  with _warnings() as records:
    results = train.train_and_evaluate(_run_config(), str(damaged),
                                       mode='train')
  assert results['step'] == 6
  assert [r.getMessage() for r in records if 'damaged' in r.getMessage()
          ][0].startswith('Checkpoint step 6 is damaged (state/')
  assert sorted(os.listdir(damaged / 'checkpoints')) == [
      '2', '4', '6', '6.damaged']
  _assert_same_final_params(damaged, straight_run)


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path, monkeypatch,
                                                    straight_run):
  with monkeypatch.context() as patch:
    _sigterm_after(patch, 3)
    results = train.train_and_evaluate(_run_config(), str(tmp_path),
                                       mode='train')
  assert results['step'] == 3  # Saved at once, off the every-2 schedule.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']
  results = train.train_and_evaluate(_run_config(), str(tmp_path),
                                     mode='train')
  assert results['step'] == 6
  _assert_same_final_params(tmp_path, straight_run)


# ----------------------------------------------------------------------------
# 5. User errors end in one line, bugs keep their traceback


def _main(tmp_path, capsys, *flags):
  status = cli.call(main.main, ['main', f'--workdir={tmp_path}', *flags])
  return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize('flags, message', [
    ([f'--config={ROOT}/configs/divided.py'],
     r'config\.data\.data_dir is empty: set it to the folder of kinetics400 '),
    ([f'--config={ROOT}/configs/divided.py:nonsense'],
     r'flag --config=\S+:nonsense: Error whilst parsing config file: Unknown'
     r" config arg 'nonsense' in 'nonsense'; "),
    ([f'--config={ROOT}/configs/divided.py:demo',
      '--config.on_nonfinite=maybe'],
     r"Unknown config\.on_nonfinite 'maybe'; valid: \['skip', 'stop'\]\.$"),
    ([f'--config={ROOT}/configs/divided.py:demo',
      '--config.model.attention=nope'],
     r"Unknown attention scheme 'nope'; valid: \["),
    # Evaluating a workdir that holds no run would score random weights.
    ([f'--config={ROOT}/configs/divided.py:demo', '--mode=eval'],
     r'--mode=eval found no checkpoint in \S+/checkpoints and config\.'
     r"init_from\.path is 'scratch', so it would evaluate random weights: "),
])
def test_main_ends_an_expected_problem_in_one_line(tmp_path, capsys, flags,
                                                   message):
  status, lines = _main(tmp_path, capsys, *flags)
  assert status == 2
  assert len(lines) == 1, lines
  assert re.match(f'main: error: {message}', lines[0]), lines[0]


@pytest.mark.parametrize('program, module', [
    ('main', main), ('convert', convert), ('export', export)])
@pytest.mark.parametrize('override, message', [
    ('--config.dataset.data_dir=x',
     "unknown config field 'dataset' (did you mean 'data'?)"),
    ('--config.data.data_dirr=x', "unknown config field 'data_dirr' (did "
     "you mean 'data_dir' or 'tfds_dir' or 'dataset'?)"),
    ('--config.model.zzz=1', "unknown config field 'zzz'; valid: "
     "['attention', 'attention_dropout', 'attention_impl', "),
])
def test_a_mistyped_config_field_ends_in_one_line(capsys, program, module,
                                                   override, message):
  status = cli.call(module.main, [program, '--config',
                                  f'{ROOT}/configs/divided.py:demo',
                                  override, 'a', 'b'])
  lines = capsys.readouterr().err.strip().splitlines()
  assert status == 2
  assert len(lines) == 1, lines
  assert lines[0].startswith(f'{program}: error: {message}'), lines[0]


@pytest.mark.slow  # 10 s; test_clis_on_a_damaged_checkpoint_end_in_one_line.
def test_main_on_damaged_checkpoints_ends_in_one_line(tmp_path, capsys):
  config = _demo_config()
  state = jax.tree.map(jnp.asarray, train.create_train_state(
      config, jax.random.key(0), 10))
  directory = _saved_run(tmp_path, state, steps=(2, 4), config=config)
  for step in ('2', '4'):
    _truncate_all(directory / step)
  status, lines = _main(tmp_path, capsys,
                        f'--config={ROOT}/configs/divided.py:demo',
                        '--config.model.depth=1', '--config.batch_size=8',
                        '--mode=train')
  assert status == 2
  assert len(lines) == 1, lines
  assert re.fullmatch(
      rf'main: error: No checkpoint in {directory} restores: step 4: '
      rf'{_UNREADABLE}.*; step 2: {_UNREADABLE}.*\. Nothing was changed on '
      r'disk; move the directory aside to start afresh\.',
      lines[0]), lines[0]


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
  """A library's ValueError (a shape JAX refuses) is no user error."""
  def buggy(*args, **kwargs):
    return evaluation.video_metrics(jnp.zeros((2, 3)),
                                    jnp.zeros(3, jnp.int32), jnp.ones(2, bool))
  monkeypatch.setattr(train, 'train_and_evaluate', buggy)
  with pytest.raises(ValueError, match='Incompatible shapes'):
    cli.call(main.main, ['main', f'--workdir={tmp_path}',
                         f'--config={ROOT}/configs/divided.py:demo'])


def test_expected_problems_are_raised_on_purpose_by_this_package():
  def error(fn):
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      return e
    raise AssertionError('no error')

  config = _tiny_config()
  config.optimizer.schedule = 'weekly'
  assert cli.expected(error(lambda: train.learning_rate_schedule(config, 1)))
  assert cli.expected(error(lambda: open('/nonexistent/file')))
  # The same types raised by a library, or by an expression of ours, are
  # bugs: JAX's shape check under jit, a conversion in the package.
  assert not cli.expected(error(lambda: jax.jit(evaluation.video_metrics)(
      jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32), jnp.ones(2, bool))))
  assert not cli.expected(error(lambda: checkpoints.resample_time_embedding(
      np.zeros((1, 4, 8)), 'x')))
  assert not cli.expected(error(lambda: {}['key']))


@pytest.mark.slow
def test_the_cli_without_data_prints_one_line_and_exits_2(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'tsformer_jax.main',
       '--config=configs/divided.py', f'--workdir={tmp_path}'],
      cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      'main: error: config.data.data_dir is empty: set it to the folder of '
      'kinetics400')


def _main_process(*flags):
  return subprocess.run(
      [sys.executable, '-m', 'tsformer_jax.main',
       '--config=configs/divided.py:demo', *flags],
      cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_mistyped_config_field_ends_the_program_in_one_line(tmp_path):
  run = _main_process('--config.dataset.data_dir=x', f'--workdir={tmp_path}')
  assert run.returncode == 2
  assert run.stderr.strip() == (
      "main: error: unknown config field 'dataset' (did you mean 'data'?)")


@pytest.mark.slow
def test_the_console_shows_progress_and_hides_library_chatter(tmp_path):
  run = ['--config.num_train_steps=8', '--config.log_every_steps=4',
         '--config.checkpoint_every_steps=4', f'--workdir={tmp_path}']
  quiet = _main_process(*run, '--mode=train')
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  lines = quiet.stderr.splitlines()
  # Ours and clu's: the plan, each logged step, progress with its ETA.
  assert any(f'checkpoints every 4 steps, the last 3 kept, in {tmp_path}'
             in line for line in lines), lines
  assert sum('train/loss=' in line for line in lines) == 2, lines
  assert any('steps/s' in line and 'ETA' in line for line in lines), lines
  # Orbax's INFO lines (a hundred or more in a run) stay hidden...
  assert not [line for line in lines if 'orbax' in line.lower() or
              'checkpoint_manager.py' in line], lines
  # TensorFlow's (clu writes through it) neither.
  assert not [line for line in lines if 'oneDNN' in line], lines
  assert len(lines) < 40, lines
  # ... unless asked for.
  verbose = _main_process(*run, '--mode=eval', '--verbosity=1')
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  assert 'checkpoint_manager.py' in verbose.stderr
