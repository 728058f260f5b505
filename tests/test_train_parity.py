"""Training steps equal to the original recipe's, run in PyTorch.

The reference is `torch.optim.SGD` (Nesterov momentum 0.9, weight decay 1e-4
on every parameter, no dampening), driven as the original's `train_net.py`
drives it: the learning rate set before each update from its
`steps_with_relative_lrs` policy, and with gradient accumulation, one
backward pass per micro-batch, the gradients divided by their count before
the step. The model side is Hugging Face's `TimesformerForVideoClassification`
with `nn.CrossEntropyLoss`; weights go between the two with the checkpoint
converter, a pure re-layout.
"""

import functools

import jax
import numpy as np
import optax
import torch

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import config_lib
from tsformer_jax import train

from checkpoint_sources import hf_timesformer

# The original configs' schedule (`configs/Kinetics/*.yaml`):
# lr = BASE_LR * LRS[i] from epoch STEPS[i] on, up to MAX_EPOCH.
STEPS, LRS, MAX_EPOCH = (0, 11, 14), (1.0, 0.1, 0.01), 15


def original_lr(base_lr: float, epoch: float) -> float:
  """The original's `lr_func_steps_with_relative_lrs` (no warm-up)."""
  bounds = [*STEPS, MAX_EPOCH]
  index = next(i for i, b in enumerate(bounds) if epoch < b) - 1
  return base_lr * LRS[index]


def paper_config():
  """The tiny model with the default (the paper's) optimizer, and no
  stochastic depth, whose random draws torch cannot share."""
  config = config_lib.get_config('divided', 'tiny')
  config.model.drop_path = 0.0
  return config


def test_recipe_is_the_original_solver():
  """The defaults are the original configs' SOLVER section, and its batch:
  GLOBAL_BATCH_SIZE 64 from micro-batches of TRAIN.BATCH_SIZE 8."""
  config = config_lib.get_config('divided')
  assert (config.batch_size, config.grad_accum_steps) == (64, 8)
  opt = config.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum, opt.nesterov,
          opt.weight_decay) == ('sgd', 0.005, 0.9, True, 1e-4)
  assert (opt.schedule, tuple(opt.decay_epochs), opt.decay_factor,
          opt.warmup_epochs, opt.grad_clip_norm) == ('steps', (11, 14), 0.1,
                                                     0.0, 0.0)


def test_schedule_is_the_originals_at_every_step():
  """Update `s` of epoch `s // steps_per_epoch` takes that epoch's rate,
  as the original's per-iteration `get_epoch_lr` gives it, over all 15
  epochs; and torch's `MultiStepLR` at the same milestones agrees."""
  config = paper_config()
  steps_per_epoch = 7  # Boundaries at updates 77 and 98, of 105.
  schedule = train.learning_rate_schedule(config, steps_per_epoch)
  steps = np.arange(train.total_steps(config, steps_per_epoch))
  ours = np.asarray(jax.vmap(schedule)(steps))
  want = [original_lr(0.005, s / steps_per_epoch) for s in steps]
  np.testing.assert_allclose(ours, want, rtol=1e-6)
  np.testing.assert_allclose(ours[[76, 77, 97, 98]],
                             [5e-3, 5e-4, 5e-4, 5e-5], rtol=1e-6)

  optimizer = torch.optim.SGD([torch.zeros(1)], lr=0.005)
  multistep = torch.optim.lr_scheduler.MultiStepLR(
      optimizer, milestones=[11 * steps_per_epoch, 14 * steps_per_epoch],
      gamma=0.1)
  torch_lrs = []
  for _ in steps:
    torch_lrs.append(optimizer.param_groups[0]['lr'])
    optimizer.step()
    multistep.step()
  np.testing.assert_allclose(ours, torch_lrs, rtol=1e-6)


def test_optimizer_is_torch_sgd_over_a_whole_run():
  """`create_optimizer` against `torch.optim.SGD` on the same gradients,
  through all 15 epochs of the schedule (one update each).

  The gradients are as small as the decay term (weight decay x params), so
  that decay on every leaf (biases and norms too), the order of decay and
  momentum, the momentum's first step and Nesterov's form each matter:
  getting any one wrong moves the parameters by hundreds of float32 ulps
  over the run. The tolerance is 4 ulps (measured: bit-equal).
  """
  config = paper_config()
  rng = np.random.default_rng(0)
  params = {'bias': rng.normal(size=(5,)), 'kernel': rng.normal(size=(3, 5)),
            'norm': {'scale': 1 + rng.normal(size=(5,))}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  leaves, treedef = jax.tree.flatten(params)
  tx = train.create_optimizer(config, steps_per_epoch=1)
  opt_state = tx.init(params)
  weights = [torch.tensor(x, requires_grad=True) for x in leaves]
  reference = torch.optim.SGD(weights, lr=0.005, momentum=0.9, nesterov=True,
                              weight_decay=1e-4, dampening=0.0)
  update = jax.jit(tx.update)
  start = [x.copy() for x in leaves]
  for step in range(MAX_EPOCH):
    grads = [(1e-4 * rng.normal(size=x.shape)).astype(np.float32)
             for x in leaves]
    updates, opt_state = update(jax.tree.unflatten(treedef, grads),
                                opt_state, params)
    params = optax.apply_updates(params, updates)
    for group in reference.param_groups:
      group['lr'] = original_lr(0.005, step)
    for w, g in zip(weights, grads, strict=True):
      w.grad = torch.from_numpy(g)
    reference.step()
    for ours, want, before in zip(jax.tree.leaves(params), weights, start,
                                  strict=True):
      want = want.detach().numpy()
      moved = np.abs(want - before).max()
      assert moved > 1e-7  # Decay and gradients move every leaf.
      np.testing.assert_array_max_ulp(ours, want, maxulp=4)


def _torch_step(model, optimizer, lr, clips, labels, micro):
  """One update as the original's train loop makes it: a backward pass per
  consecutive micro-batch (mean loss), gradients divided by their count,
  then the step. Returns the mean of the micro-batches' losses."""
  for group in optimizer.param_groups:
    group['lr'] = lr
  optimizer.zero_grad()
  inputs = torch.from_numpy(clips).permute(0, 1, 4, 2, 3)  # [B, T, 3, H, W]
  targets = torch.from_numpy(labels).long()
  losses = []
  for x, y in zip(inputs.chunk(micro), targets.chunk(micro), strict=True):
    loss = torch.nn.CrossEntropyLoss()(model(x).logits, y)
    loss.backward()
    losses.append(loss.item())
  for p in model.parameters():
    p.grad /= micro
  optimizer.step()
  return float(np.mean(losses))


def test_train_steps_equal_the_originals_sgd_in_torch():
  """Three `train.train_step`s of the paper's recipe (batch 4 accumulated
  over 2 micro-batches, stochastic depth off) from Hugging Face's weights
  give the losses and parameters of three torch steps of the original's
  loop on the HF model.

  Tolerances (float32): losses rtol 1e-6 (measured: equal); every
  parameter within 2e-7 relative (2 ulps) plus 1e-3 of how far the steps
  have moved it (the two backward passes round differently: measured
  2.5e-4 of the move at most). Weight decay applied after the momentum, or
  left out, breaks this on most parameters.
  """
  hf = hf_timesformer(0, num_frames=4, image_size=32, patch_size=8,
                      hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128,
                      num_labels=10).train()
  config = checkpoints.config_from_hf(hf.config.to_dict())
  config.optimizer = paper_config().optimizer
  config.grad_accum_steps = 2
  assert config.model.drop_path == 0.0 and config.label_smoothing == 0.0
  assert config.mixup_alpha == 0.0
  assert tuple(config.data.mean) == (0.45,) * 3
  assert tuple(config.data.std) == (0.225,) * 3
  steps_per_epoch = 100
  params = _params(hf, config)
  start = _flat(params)
  state = train.TrainState.create(
      apply_fn=tsformer_jax.create_model(config).apply, params=params,
      tx=train.create_optimizer(config, steps_per_epoch))
  schedule = train.learning_rate_schedule(config, steps_per_epoch)
  step_fn = jax.jit(functools.partial(train.train_step, config=config,
                                      schedule=schedule))
  optimizer = torch.optim.SGD(hf.parameters(), lr=0.005, momentum=0.9,
                              nesterov=True, weight_decay=1e-4)
  rng = np.random.default_rng(0)
  for step in range(3):
    pixels = rng.integers(0, 256, (4, 4, 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, 4).astype(np.int32)
    state, metrics = step_fn(state, dict(clips=pixels, labels=labels),
                             jax.random.key(0))
    # The original's normalisation, which our step does on the device.
    clips = (pixels.astype(np.float32) / 255 - np.float32(0.45)) / np.float32(
        0.225)
    want_loss = _torch_step(hf, optimizer,
                            original_lr(0.005, step / steps_per_epoch),
                            clips, labels, config.grad_accum_steps)
    np.testing.assert_allclose(float(metrics['loss']), want_loss, rtol=1e-6)
    assert float(metrics['learning_rate']) == np.float32(0.005)
    want = _flat(_params(hf, config))
    ours = _flat(state.params)
    assert ours.keys() == want.keys()
    for name, reference in want.items():
      moved = np.abs(reference - start[name]).max()
      assert moved > 0, name  # Every parameter trains.
      np.testing.assert_allclose(ours[name], reference, rtol=2e-7,
                                 atol=1e-3 * moved,
                                 err_msg=f'step {step}: {name}')


def _params(model, config):
  """Our params from the HF model's current weights, copied: converted
  arrays may share memory with the tensors that torch updates in place."""
  return checkpoints.params_from_hf_state_dict(
      {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
      config)


def _flat(params) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(params)}
