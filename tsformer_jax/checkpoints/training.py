"""Training checkpoints: a `CheckpointManager` of train states and configs.

`load_checkpoint` reads their params back (`formats.orbax`), under the same
item names.

What survives: orbax commits a step by renaming it into place, so a killed
job leaves only whole steps. A step damaged afterwards (a truncated, missing
or garbled file) is found when resuming: `restore_latest` moves it aside to
`<step>.damaged`, never deleting it, and resumes from the newest step that
restores completely. `save` refuses a state holding a NaN or an Inf, so that
every step on disk is one to resume from.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from tsformer_jax.checkpoints.formats.orbax import CheckpointError
from tsformer_jax.checkpoints.formats.orbax import item_tree
from tsformer_jax.checkpoints.formats.orbax import nonfinite_leaves
from tsformer_jax.checkpoints.formats.orbax import reading
from tsformer_jax.checkpoints.spec import CONFIG_ITEM
from tsformer_jax.checkpoints.spec import PARAMS_ITEM
from tsformer_jax.checkpoints.spec import STATE_ITEM

_LOG = logging.getLogger(__name__)

# A step that does not restore is renamed `<step>.damaged` (then .1, .2...).
DAMAGED_SUFFIX = '.damaged'

def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Keeps the last `config.keep_checkpoints` and the best by eval top-1
  (multi-label: by mAP)."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(config.keep_checkpoints),
      ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m.get('map', m['top1']), n=1,
          keep_checkpoints_without_metrics=False),
  ])
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(preservation_policy=policy,
                                           cleanup_tmp_directories=True),
      item_names=(STATE_ITEM, CONFIG_ITEM))


def save(manager: ocp.CheckpointManager, state, config,
         metrics: dict | None = None):
  """Saves `state` (a flax `TrainState`) and `config` at `state.step`.

  Raises:
    CheckpointError: `state` holds a NaN or an Inf; nothing is written.
  """
  savable = _savable(state)
  bad = nonfinite_leaves(savable)
  if bad:
    last = manager.latest_step()
    raise CheckpointError(
        f'Step {int(state.step)} not saved: non-finite values (NaN or Inf) '
        f'in {_some(bad)}; the last checkpoint is '
        f'{"none" if last is None else f"step {last}"} in '
        f'{manager.directory}.')
  manager.save(int(state.step), args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(savable),
      CONFIG_ITEM: ocp.args.JsonSave(config.to_dict())}), metrics=metrics,
               force=True)


def restore(manager: ocp.CheckpointManager, state, step: int):
  """`state` with the step, params and optimizer state saved at `step`.

  Raises:
    CheckpointError: the step does not restore completely (an item or array
      that cannot be read, values that are not finite); the message says
      why.
  """
  directory = os.path.join(os.fspath(manager.directory), str(step))
  for item in (STATE_ITEM, CONFIG_ITEM):
    if not os.path.isdir(os.path.join(directory, item)):
      raise CheckpointError(f'{item}/ is missing')
  with reading(f'{CONFIG_ITEM}/'):
    manager.restore(step, args=ocp.args.Composite(**{
        CONFIG_ITEM: ocp.args.JsonRestore()}))
  with reading(f'{STATE_ITEM}/ metadata'):
    item_tree(directory, STATE_ITEM)
  with reading(f'{STATE_ITEM}/'):
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(_savable(state))}))[STATE_ITEM]
  bad = nonfinite_leaves(restored)
  if bad:
    raise CheckpointError(f'non-finite values (NaN or Inf) in {_some(bad)}')
  return state.replace(step=restored['step'], params=restored[PARAMS_ITEM],
                       opt_state=restored['opt_state'])


def restore_latest(manager: ocp.CheckpointManager, state):
  """`state` restored from the newest step of `manager` that restores
  completely, or `state` itself when there is no step.

  Each newer step, damaged, is renamed `<step>.damaged` (`<step>.damaged.1`,
  ... if taken) beside the others, kept for a post-mortem, and named in a
  warning with the reason. Every process of a job must call this.

  Raises:
    CheckpointError: there are steps but none restores; it lists each step
      and why, and nothing on disk is changed.
  """
  damaged = []
  restored = None
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = restore(manager, state, step)
    except CheckpointError as e:
      damaged.append((step, str(e)))
      continue
    break
  if restored is None and damaged:
    raise CheckpointError(
        f'No checkpoint in {manager.directory} restores: ' +
        '; '.join(f'step {s}: {why}' for s, why in damaged) + '. Nothing was '
        'changed on disk; move the directory aside to start afresh.')
  if damaged:
    moved = _set_aside(manager, [s for s, _ in damaged])
    for (step, why), target in zip(damaged, moved, strict=True):
      _LOG.warning('Checkpoint step %d is damaged (%s): moved to %s; '
                   'resuming from step %d.', step, why, target,
                   int(restored.step))
  if restored is None:
    aside = sorted(n for n in os.listdir(os.fspath(manager.directory))
                   if DAMAGED_SUFFIX in n)
    if aside:  # Never a silent fresh start beside a run's steps.
      _LOG.warning('No step to resume from in %s (set aside: %s); starting '
                   'from step 0.', manager.directory, ', '.join(aside))
    return state
  _LOG.info('Resuming from step %d in %s.', int(restored.step),
            manager.directory)
  return restored


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]
               ) -> list[str]:
  """Renames `steps` out of the manager's sight, so that training can write
  those steps again, and keeps them; returns their new paths."""
  targets = []
  for step in steps:
    source = os.path.join(os.fspath(manager.directory), str(step))
    target, n = source + DAMAGED_SUFFIX, 0
    while os.path.exists(target):
      n += 1
      target = f'{source}{DAMAGED_SUFFIX}.{n}'
    targets.append(target)
  if jax.process_count() > 1:  # Every process has finished reading them.
    multihost_utils.sync_global_devices('tsformer_jax:damaged_read')
  if jax.process_index() == 0:
    for step, target in zip(steps, targets, strict=True):
      os.rename(os.path.join(os.fspath(manager.directory), str(step)),
                target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tsformer_jax:damaged_moved')
  manager.reload()
  return targets


def _some(paths: list[str], n: int = 3) -> str:
  more = f' and {len(paths) - n} more' if len(paths) > n else ''
  return ', '.join(paths[:n]) + more


def _savable(state) -> dict[str, Any]:
  return {'step': state.step, PARAMS_ITEM: state.params,
          'opt_state': state.opt_state}
