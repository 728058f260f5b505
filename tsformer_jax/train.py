"""Training: the train state, the optimizer, the train step and the loop.

`train_and_evaluate(config, workdir)` runs a whole job: it resumes from the
last checkpoint in `workdir` if there is one, trains with the paper's recipe
(or whatever `config.optimizer` says), evaluates with multi-view testing
(`evaluation.evaluate`), writes TensorBoard summaries and
`workdir/results.json`.

Determinism: the batch of step `s` and the dropout / mixup randomness of
step `s` are functions of (config.seed, s) only, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import copy
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

from clu import metric_writers
from clu import periodic_actions
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tsformer_jax import checkpoints
from tsformer_jax import clip_lib
from tsformer_jax import config_lib
from tsformer_jax import datasets
from tsformer_jax import evaluation
from tsformer_jax import input_pipeline
from tsformer_jax import losses
from tsformer_jax import model as model_lib
from tsformer_jax import sharding

TrainState = train_state.TrainState


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """`config.optimizer.schedule`: 'steps' (the paper's) or 'cosine'.

  Without warm-up (the recipe), 'steps' is the original's
  `steps_with_relative_lrs`: update `s` takes the rate of epoch
  `s // steps_per_epoch`, `decay_factor` times lower for each of
  `decay_epochs` reached (tests/test_train_parity.py).
  """
  opt = config.optimizer
  warmup = int(opt.warmup_epochs * steps_per_epoch)
  total = total_steps(config, steps_per_epoch)
  if opt.schedule == 'steps':
    main = optax.piecewise_constant_schedule(
        opt.learning_rate,
        {int(e * steps_per_epoch) - warmup: opt.decay_factor
         for e in opt.decay_epochs})
  elif opt.schedule == 'cosine':
    main = optax.cosine_decay_schedule(opt.learning_rate,
                                       max(total - warmup, 1))
  else:
    raise ValueError(f'Unknown optimizer.schedule {opt.schedule!r}; valid: '
                     "['cosine', 'steps'].")
  if not warmup:
    return main
  ramp = optax.linear_schedule(0.0, opt.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


STATE_DTYPES = ('float32', 'bfloat16')


def create_optimizer(config, steps_per_epoch: int
                     ) -> optax.GradientTransformation:
  """`config.optimizer.name`: 'sgd' (momentum, Nesterov; the paper's) or
  'adamw'; weight decay on all parameters and optional gradient clipping.
  `config.optimizer.state_dtype` stores the momentum (SGD) or first moment
  (AdamW) in that dtype; AdamW's second moment stays float32."""
  opt = config.optimizer
  schedule = learning_rate_schedule(config, steps_per_epoch)
  clip = ([optax.clip_by_global_norm(opt.grad_clip_norm)]
          if opt.grad_clip_norm else [])
  state_dtype = opt.state_dtype
  if state_dtype not in STATE_DTYPES:
    raise ValueError(f'Unknown optimizer.state_dtype {state_dtype!r}; '
                     f'valid: {list(STATE_DTYPES)}.')
  if opt.name == 'sgd':
    # torch.optim.SGD's step, which the original takes (bit for bit, see
    # tests/test_train_parity.py): the decay joins the gradient before the
    # momentum, whose buffer starts at the first gradient (optax's trace
    # starts at zero: the same), and Nesterov's update is g + m * buffer.
    return optax.chain(*clip, optax.add_decayed_weights(opt.weight_decay),
                       optax.sgd(schedule, opt.momentum, opt.nesterov,
                                 accumulator_dtype=state_dtype))
  if opt.name == 'adamw':
    return optax.chain(*clip, optax.adamw(schedule, b1=opt.b1, b2=opt.b2,
                                          weight_decay=opt.weight_decay,
                                          mu_dtype=state_dtype))
  raise ValueError(f"Unknown optimizer.name {opt.name!r}; valid: ['adamw', "
                   "'sgd'].")


def total_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return int(config.num_epochs * steps_per_epoch)


def create_train_state(config, rng: jax.Array, steps_per_epoch: int,
                       mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Parameters (fresh, or ViT / TimeSformer weights from `config.init_from`)
  and optimizer state.

  With a `mesh`, every array is placed with `sharding.state_shardings`
  (replicated, or split over the `fsdp` axis); every process must pass the
  same `rng`, so that all of them build the same values.
  """
  model = model_lib.create_model(config)
  params = checkpoints.init_params_from(config, rng)
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=create_optimizer(config, steps_per_epoch))
  if mesh is None:
    return state
  shardings = sharding.state_shardings(state, mesh, config)
  return jax.tree.map(_put, state, shardings)


def _put(x, target: jax.sharding.Sharding) -> jax.Array:
  # Every process holds the whole value; each places its own shards.
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, target, lambda i: x[i])


NONFINITE_POLICIES = ('skip', 'stop')


def nonfinite_policy(config) -> str:
  """`config.on_nonfinite`, checked."""
  policy = config.on_nonfinite
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f'Unknown config.on_nonfinite {policy!r}; valid: '
                     f'{list(NONFINITE_POLICIES)}.')
  return policy


def _all_finite(tree) -> jax.Array:
  return jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
                   ).all()


def train_step(state: TrainState, batch: dict[str, jax.Array],
               rng: jax.Array, *, config, schedule: optax.Schedule
               ) -> tuple[TrainState, dict]:
  """One optimizer update from `batch`, accumulated over micro-batches.

  Args:
    state: parameters and optimizer state.
    batch: `clips [B, T, H, W, 3]`, `labels` int `[B]` or multi-hot
      `[B, C]` (multi-label: `config.model.loss='sigmoid'`); clips are RGB
      pixel values (uint8, or float32 from the original's resize),
      normalised here with `config.data.mean` / `std`, in
      `config.data.channel_order`.
    rng: the run's key; the step's keys are folded in from `state.step`.
    config: the job config (bound with functools.partial before jit).
    schedule: the learning rate schedule, for the metrics.

  Returns:
    The new state and the metrics `loss` (`losses.loss`), `accuracy` (the
    share of clips whose best class is theirs), `learning_rate` and
    `nonfinite` (the loss, gradients or new state hold a NaN or an Inf;
    with `config.on_nonfinite='skip'` the update was then dropped: the
    params and optimizer state are the old ones, the step advances).
  """
  rng = jax.random.fold_in(rng, state.step)
  mix_rng, dropout_rng = jax.random.split(rng)
  loss_name = losses.loss_name(config)
  losses.check_labels(loss_name, batch['labels'])
  targets = losses.targets(batch['labels'], config.model.num_classes,
                           config.label_smoothing)
  # Clips leave the host as pixel values and normalise here.
  clips = clip_lib.device_normalize(
      batch['clips'], config.data.mean, config.data.std,
      config.data.channel_order)
  if config.mixup_alpha > 0:
    clips, targets = losses.mixup(mix_rng, clips, targets,
                                  config.mixup_alpha)
  micro = config.grad_accum_steps
  if clips.shape[0] % micro:
    raise ValueError(f'batch of {clips.shape[0]} does not split into '
                     f'grad_accum_steps={micro} micro-batches.')
  # Micro-batch i takes examples i, i + micro, ...: with the batch split
  # over devices, every micro-batch then keeps every device busy.
  split = lambda x: x.reshape((-1, micro) + x.shape[1:]).swapaxes(0, 1)

  def loss_fn(params, clips, targets, rng):
    logits = state.apply_fn({'params': params}, clips, train=True,
                            rngs={'dropout': rng})
    return losses.loss(loss_name, logits, targets), logits

  def accumulate(carry, xs):
    grads, loss, correct = carry
    clips, targets, labels, i = xs
    (step_loss, logits), step_grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, clips, targets,
                               jax.random.fold_in(dropout_rng, i))
    correct += jnp.sum(losses.top1_hits(logits, labels))
    return (jax.tree.map(jnp.add, grads, step_grads), loss + step_loss,
            correct), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, loss, correct), _ = jax.lax.scan(
      accumulate, (zeros, 0.0, 0),
      (split(clips), split(targets), split(batch['labels']),
       jnp.arange(micro)))
  grads = jax.tree.map(lambda g: g / micro, grads)
  new_state = state.apply_gradients(grads=grads)
  # The host reads this flag only with the metrics, so no sync per step.
  finite = _all_finite((loss, grads, new_state.params, new_state.opt_state))
  if nonfinite_policy(config) == 'skip':
    new_state = new_state.replace(
        params=_unless(finite, new_state.params, state.params),
        opt_state=_unless(finite, new_state.opt_state, state.opt_state))
  return new_state, dict(loss=loss / micro,
                         accuracy=correct / clips.shape[0],
                         learning_rate=schedule(state.step),
                         nonfinite=jnp.logical_not(finite))


def _unless(finite: jax.Array, new, old):
  """`new` where `finite`, else `old`, leaf by leaf; integer leaves (optax's
  step counts) take `new` always, so that the learning-rate schedule keeps
  pace with `state.step` over a dropped update."""
  return jax.tree.map(
      lambda n, o: n if jnp.issubdtype(n.dtype, jnp.integer)
      else jnp.where(finite, n, o), new, old)


def jit_train_step(config, state: TrainState, schedule: optax.Schedule,
                   mesh: jax.sharding.Mesh) -> Callable:
  """`train_step` with explicit shardings: the state as
  `sharding.state_shardings` lays it out, the batch split over the mesh,
  key and metrics replicated. The old state's buffers are donated."""
  sharding.check_batch_size(config.batch_size // config.grad_accum_steps,
                            mesh, 'batch_size / grad_accum_steps')
  state_shardings = sharding.state_shardings(state, mesh, config)
  replicated = sharding.replicated(mesh)
  return jax.jit(
      functools.partial(train_step, config=config, schedule=schedule),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                    replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=0)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can save first."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint before stopping.')
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(FloatingPointError):
  """A NaN or Inf loss or update, with `config.on_nonfinite='stop'`."""


class _NonFiniteSteps:
  """The steps whose update was not finite, read from the step metrics when
  they reach the host anyway (logging) and before every save."""

  def __init__(self, policy: str):
    self.policy = policy
    self.steps = set()

  def check(self, history: list[dict], last_step: int, manager):
    """Notes the non-finite steps among `history`, the metrics of the steps
    up to `last_step`; with 'stop', raises `NonFiniteLossError` on one."""
    first = last_step - len(history) + 1
    flags = jax.device_get([h['nonfinite'] for h in history])
    bad = [first + i for i, flag in enumerate(flags) if flag]
    self.steps.update(bad)
    if not bad or self.policy != 'stop':
      return
    loss = float(jax.device_get(history[bad[0] - first]['loss']))
    manager.wait_until_finished()
    last = manager.latest_step()
    raise NonFiniteLossError(
        f'Step {bad[0]}: ' + (f'the training loss is {loss}' if not
                              math.isfinite(loss) else
                              f'the update is not finite (loss {loss:.4g})')
        + "; stopped (config.on_nonfinite='stop'), saving nothing after "
        'it. ' + ('No checkpoint was saved before it' if last is None else
                  f'The last good checkpoint is step {last} in '
                  f'{manager.directory}')
        + '. Lower the learning rate, or set --config.on_nonfinite=skip to '
        'drop such updates.')


def _with_class_names(config: ml_collections.ConfigDict,
                      source: clip_lib.Source) -> ml_collections.ConfigDict:
  """`config`, naming its classes, so that its checkpoints carry the names:
  `config.data.class_names`, else those of `source` (the training split)
  where it has them (prepared TFDS data), else the dataset's; where they fit
  the head."""
  if config.data.class_names or not config.model.num_classes:
    return config
  names = getattr(source, 'class_names', None)
  try:
    names = names or datasets.class_names(config)
  except (ValueError, OSError) as e:
    logging.warning('Checkpoints will carry no class names: %s', e)
    return config
  if len(names) != config.model.num_classes:
    return config
  return config_lib.with_class_names(config, names)


def _start_config(config: ml_collections.ConfigDict, mode: str,
                  manager) -> ml_collections.ConfigDict:
  """The config whose `init_from` builds the first state.

  A new run fetches its initial weights here, before any compute: weights
  it cannot have stop it in one line, and the state is built from their
  local copy (the Hub asked once). A resumed run reads none.
  """
  start = copy.deepcopy(config)
  if manager.latest_step() is not None:
    start.init_from.path = config_lib.SCRATCH
    return start
  source = checkpoints.init_source(config)
  if mode == 'eval' and (source is None or checkpoints.detect_format(source)
                         in checkpoints.IMAGE_FORMATS):
    weights = (f'is {config_lib.SCRATCH!r}' if source is None else
               f'({config.init_from.path}) holds image weights, whose head '
               'is new')
    raise FileNotFoundError(
        f'--mode=eval found no checkpoint in {manager.directory} and '
        f'config.init_from.path {weights}, so it would evaluate random '
        'weights: point --workdir at a trained run, or set '
        '--config.init_from.path to the weights to evaluate.')
  if source is not None:
    start.init_from.path = source
  return start


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = 'train_and_eval') -> dict[str, Any]:
  """Runs (or resumes) a job; returns what it writes to results.json."""
  if mode not in ('train', 'eval', 'train_and_eval'):
    raise ValueError(f"Unknown mode {mode!r}; valid: ['eval', 'train', "
                     "'train_and_eval'].")
  nonfinite = _NonFiniteSteps(nonfinite_policy(config))
  if mode != 'train' and config.data.test_clip_stride > 0:
    evaluation.long_video_coverage(config)  # Fails now, not after training.
  os.makedirs(workdir, exist_ok=True)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  train_source = datasets.get_source(config, config.data.train_split)
  # Both splits are opened first, so that a missing one fails at start.
  eval_source = datasets.get_source(config, config.data.eval_split)
  config = _with_class_names(config, train_source)
  steps_per_epoch = len(train_source) // config.batch_size
  num_steps = total_steps(config, steps_per_epoch)
  manager = checkpoints.training.checkpoint_manager(workdir, config)
  mesh = sharding.create_mesh(config)
  logging.info('Mesh %s over %d devices in %d processes.', dict(mesh.shape),
               mesh.size, jax.process_count())
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(_start_config(config, mode, manager), init_rng,
                             steps_per_epoch, mesh)
  # The newest step that restores; damaged newer ones are moved aside.
  state = checkpoints.training.restore_latest(manager, state)
  logging.info('%d steps (%d per epoch); checkpoints every %d steps, the '
               'last %d kept, in %s; summaries in %s (TensorBoard).',
               num_steps, steps_per_epoch, config.checkpoint_every_steps,
               config.keep_checkpoints, manager.directory, workdir)
  # Per split: the counters know videos by their index in the split.
  skipped = input_pipeline.SkipCounter()
  eval_skipped = input_pipeline.SkipCounter()
  eval_step = evaluation.jit_eval_step(config, state.params, state.apply_fn,
                                       mesh)

  def evaluate_and_log(state):
    metrics = evaluation.evaluate(config, state.params, state.apply_fn,
                                  eval_source, eval_skipped, eval_step, mesh)
    writer.write_scalars(int(state.step), {
        f'eval/{k}': v for k, v in metrics.items() if k != 'per_class_ap'})
    return metrics

  results, metrics = {}, None
  if mode != 'eval':
    schedule = learning_rate_schedule(config, steps_per_epoch)
    state, results['train_loss'], metrics = _train(
        config, workdir, state, step_rng, num_steps, schedule, train_source,
        manager, writer, skipped, mesh,
        evaluate_and_log if mode == 'train_and_eval' else None, nonfinite)
  finished = int(state.step) >= num_steps
  if mode == 'eval' or (mode == 'train_and_eval' and finished and
                        metrics is None):
    metrics = evaluate_and_log(state)  # E.g. resumed after the last save.
  if metrics is not None:
    results.update(_eval_results(metrics))
  manager.wait_until_finished()
  results.update(step=int(state.step),
                 skipped_videos=(skipped_everywhere(skipped) +
                                 skipped_everywhere(eval_skipped)),
                 skipped_updates=len(nonfinite.steps))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  writer.flush()
  return results


def _eval_results(metrics: dict[str, Any]) -> dict[str, Any]:
  """results.json's eval entries: top-1 / top-5, or for multi-label data
  mAP, top-1 (best class a label), the classes without a positive (left out
  of the mAP) and the AP of each class (null where left out)."""
  if 'map' not in metrics:
    return dict(eval_top1=metrics['top1'], eval_top5=metrics['top5'],
                eval_loss=metrics['loss'])
  return dict(eval_map=metrics['map'], eval_top1=metrics['top1'],
              eval_loss=metrics['loss'],
              eval_classes_excluded=metrics['classes_excluded'],
              per_class_ap=metrics['per_class_ap'])


def _train(config, workdir, state, rng, num_steps, schedule, source, manager,
           writer, skipped, mesh, evaluate_fn: Callable | None,
           nonfinite: _NonFiniteSteps
           ) -> tuple[TrainState, float | None, dict | None]:
  """The training loop from `state.step` to `num_steps` (or SIGTERM).

  Saves every `config.checkpoint_every_steps`, at the end and on SIGTERM;
  with `evaluate_fn`, also evaluates every `config.eval_every_steps` and at
  the end, and saves those steps with their metrics (for the best-N).
  Returns the state, the last logged training loss and eval metrics.
  """
  step_fn = jit_train_step(config, state, schedule, mesh)
  batches = _train_batches(config, source, int(state.step), skipped, mesh)
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps,
                                           writer=writer)]
  if jax.process_index() == 0 and config.profile:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
  every = lambda n, step: n > 0 and step % n == 0
  last_loss, metrics, history, tick = None, None, [], time.time()
  with _Preemption() as preemption:
    for step in range(int(state.step) + 1, num_steps + 1):
      batch = next(batches)
      state, step_metrics = step_fn(state, batch, rng)
      for hook in hooks:
        hook(step)
      history.append(step_metrics)
      done = step == num_steps
      if every(config.log_every_steps, step) or done:
        nonfinite.check(history, step, manager)
        last_loss = _write_train_metrics(writer, step, history, tick,
                                         config.batch_size,
                                         skipped_everywhere(skipped),
                                         len(nonfinite.steps))
        history, tick = [], time.time()
      evaluating = evaluate_fn and (every(config.eval_every_steps, step) or
                                    done)
      saving = (evaluating or every(config.checkpoint_every_steps, step) or
                done or preemption.requested)
      if saving:  # Never past a non-finite step ('stop').
        nonfinite.check(history, step, manager)
      try:
        metrics = evaluate_fn(state) if evaluating else None
      except BaseException:
        # The evaluation failed (out of memory, say): the step is saved all
        # the same, so that the same command resumes here and evaluates
        # again rather than training again.
        if saving:
          checkpoints.training.save(manager, state, config)
          manager.wait_until_finished()
        raise
      if saving:
        checkpoints.training.save(manager, state, config, metrics)
      if preemption.requested:
        break
  return state, last_loss, metrics


def _train_batches(config, source: clip_lib.Source, start_step: int,
                   skipped: input_pipeline.SkipCounter,
                   mesh: jax.sharding.Mesh) -> Iterator[dict[str, jax.Array]]:
  """The batches of steps `start_step + 1, ...`, sharded over `mesh`; the
  next ones go to the devices while a step runs."""
  batches = input_pipeline.train_batches(
      source, clip_lib.clip_spec(config), config.batch_size, config.seed,
      start_step=start_step, num_workers=config.data.num_workers,
      skipped=skipped, process_index=jax.process_index(),
      process_count=jax.process_count(),
      worker_type=config.data.worker_type)
  batch_sharding = sharding.batch_sharding(mesh)
  return input_pipeline.prefetch_to_device(
      batches, lambda b: sharding.global_batch(b, batch_sharding))


def skipped_everywhere(skipped: input_pipeline.SkipCounter) -> int:
  """The distinct videos that failed in any process: each process counts
  only those it read. A collective: every process calls it in turn."""
  local = np.asarray(skipped.indices(), np.int32)
  if jax.process_count() == 1:
    return local.size
  longest = int(np.max(multihost_utils.process_allgather(
      np.int32(local.size))))
  if not longest:  # The same in every process.
    return 0
  padded = np.full(longest, -1, np.int32)
  padded[:local.size] = local
  everywhere = multihost_utils.process_allgather(padded)
  return int(np.sum(np.unique(everywhere) >= 0))


def _write_train_metrics(writer, step, history, tick, batch_size, skipped,
                         skipped_updates=0) -> float:
  history = jax.device_get(history)
  # Dropped updates ('skip') would make the means NaN.
  kept = [h for h in history if not h['nonfinite']] or history
  means = {k: float(np.mean([h[k] for h in kept])) for k in history[0]}
  seconds = time.time() - tick
  writer.write_scalars(step, {
      'train/loss': means['loss'], 'train/accuracy': means['accuracy'],
      'train/learning_rate': means['learning_rate'],
      'train/steps_per_sec': len(history) / seconds,
      'train/examples_per_sec': len(history) * batch_size / seconds,
      'train/skipped_videos': skipped,
      'train/skipped_updates': skipped_updates})
  return means['loss']
