"""Training checkpoints: a `CheckpointManager` of train states and configs.

`load_checkpoint` reads their params back (`formats.orbax`), under the same
item names.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from tsformer_jax.checkpoints.spec import CONFIG_ITEM
from tsformer_jax.checkpoints.spec import PARAMS_ITEM
from tsformer_jax.checkpoints.spec import STATE_ITEM


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Keeps the last `config.keep_checkpoints` and the best by eval top-1."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(config.keep_checkpoints),
      ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m['top1'], n=1,
          keep_checkpoints_without_metrics=False),
  ])
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(preservation_policy=policy,
                                           cleanup_tmp_directories=True),
      item_names=(STATE_ITEM, CONFIG_ITEM))


def save(manager: ocp.CheckpointManager, state, config,
         metrics: dict | None = None):
  """Saves `state` (a flax `TrainState`) and `config` at `state.step`."""
  manager.save(int(state.step), args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(_savable(state)),
      CONFIG_ITEM: ocp.args.JsonSave(config.to_dict())}), metrics=metrics,
               force=True)


def restore(manager: ocp.CheckpointManager, state, step: int):
  """`state` with the step, params and optimizer state saved at `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardRestore(_savable(state))}))[STATE_ITEM]
  return state.replace(step=restored['step'], params=restored[PARAMS_ITEM],
                       opt_state=restored['opt_state'])


def _savable(state) -> dict[str, Any]:
  return {'step': state.step, PARAMS_ITEM: state.params,
          'opt_state': state.opt_state}
