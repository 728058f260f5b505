r"""Train-step throughput and model FLOP utilisation on one GPU.

  python experiments/gpu_benchmark.py [--out=experiments/results] \
      [--batch_sizes=4,8,16,32] [--steps=10]

Divided space-time TimeSformer at the base size (8 x 224), bfloat16 compute
with float32 parameters, SGD with momentum: clips per second of a full
training step (forward, backward, update) for each batch size, for our model
with cuDNN's fused attention ('auto') and with XLA's ('xla'), and for Hugging
Face's PyTorch TimeSformer under `torch.autocast(bfloat16)` where torch with
CUDA is installed. Model FLOP utilisation counts 3x the forward FLOPs of
XLA's cost analysis per clip (forward + backward) against the GPU's dense
bfloat16 peak. Writes `gpu_<device>.json` and `.md` to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import tsformer_jax
from tsformer_jax import config_lib
from tsformer_jax import summary

# Dense bfloat16 tensor-core peaks (vendor figures, without sparsity).
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12}


def peak_flops(device_kind: str) -> float | None:
  return next((v for k, v in PEAK_BF16.items() if k in device_kind), None)


def forward_flops(config) -> float:
  """XLA's count for one clip's forward pass, compiled for the CPU: on GPUs
  the matmuls become cuBLAS calls that the cost analysis does not count."""
  with jax.default_device(jax.devices('cpu')[0]):
    return summary.summarize(config)['flops_per_clip']


def time_steps(step, state, batch, steps: int) -> list[float]:
  """Seconds per step, after two warm-up steps (compilation excluded)."""
  for _ in range(2):
    state = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state = step(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return times


def jax_train_step_times(config, batch_size: int, steps: int) -> list[float]:
  model = tsformer_jax.create_model(config)
  params = tsformer_jax.init_params(config, jax.random.key(0))
  tx = optax.sgd(0.005, momentum=0.9, nesterov=True)
  clips = jax.random.normal(jax.random.key(1), (batch_size,) +
                            tsformer_jax.dummy_clips(config).shape[1:])
  labels = jnp.arange(batch_size) % config.model.num_classes

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    params, opt_state = state
    clips, labels = batch

    def loss_fn(p):
      logits = model.apply({'params': p}, clips, train=True,
                           rngs={'dropout': jax.random.key(2)})
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return time_steps(step, (params, tx.init(params)), (clips, labels), steps)


def torch_train_step_times(batch_size: int, steps: int) -> list[float] | None:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import TimesformerConfig  # pylint: disable=g-import-not-at-top
    from transformers import TimesformerForVideoClassification  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  # Default drop_path_rate (0): some releases reject a float for it.
  model = TimesformerForVideoClassification(
      TimesformerConfig(num_labels=400)).cuda().train()
  opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9,
                        nesterov=True)
  pixels = torch.randn(batch_size, 8, 3, 224, 224, device='cuda')
  labels = torch.arange(batch_size, device='cuda') % 400

  def step():
    with torch.autocast('cuda', dtype=torch.bfloat16):
      loss = torch.nn.functional.cross_entropy(model(pixels).logits, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(2):
    step()
  torch.cuda.synchronize()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  return times


def row(name, batch_size, times, flops_per_clip, peak) -> dict:
  median = statistics.median(times)
  clips_per_sec = batch_size / median
  return dict(model=name, batch_size=batch_size,
              step_ms=1e3 * median,
              spread_ms=1e3 * (max(times) - min(times)),
              clips_per_sec=clips_per_sec,
              mfu=(3 * flops_per_clip * clips_per_sec / peak
                   if peak else None))


def markdown(device: str, config, rows: list[dict], flops: float) -> str:
  m = config.model
  lines = [f'# Train-step throughput on {device}', '',
           f'Divided space-time, {m.num_frames} x {m.image_size[0]}, '
           'bfloat16 compute, SGD; median of '
           'the timed steps (spread = max - min). MFU: 3 x forward FLOPs '
           f'({flops:.3e} per clip, XLA count) x clips/s / dense bf16 peak.',
           '', '| model | batch | step (ms) | spread (ms) | clips/s | MFU |',
           '|---|---|---|---|---|---|']
  for r in rows:
    mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '-'
    lines.append(f'| {r["model"]} | {r["batch_size"]} | {r["step_ms"]:.1f} | '
                 f'{r["spread_ms"]:.1f} | {r["clips_per_sec"]:.1f} | {mfu} |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='experiments/results')
  parser.add_argument('--batch_sizes', default='4,8,16,32')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--skip_jax', action='store_true')
  parser.add_argument('--variant', default='base',
                      help="config variant ('tiny' for a quick CPU check)")
  args = parser.parse_args()
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  device = jax.devices()[0].device_kind
  peak = peak_flops(device)
  config = config_lib.get_config('divided', args.variant)
  config.model.dtype = 'bfloat16'
  flops = forward_flops(config)
  rows = []
  for impl in () if args.skip_jax else ('auto', 'xla'):
    config.model.attention_impl = impl
    for b in batch_sizes:
      times = jax_train_step_times(config, b, args.steps)
      rows.append(row(f'tsformer_jax ({impl})', b, times, flops, peak))
      print(rows[-1], flush=True)
  for b in batch_sizes:
    times = torch_train_step_times(b, args.steps)
    if times is not None:
      rows.append(row('HF PyTorch (autocast bf16)', b, times, flops, peak))
      print(rows[-1], flush=True)
  os.makedirs(args.out, exist_ok=True)
  name = 'gpu_' + ''.join(c if c.isalnum() else '_' for c in device)
  with open(os.path.join(args.out, name + '.json'), 'w') as f:
    json.dump(dict(device=device, jax=jax.__version__,
                   python=platform.python_version(), peak_bf16=peak,
                   forward_flops_per_clip=flops, rows=rows), f, indent=2)
  with open(os.path.join(args.out, name + '.md'), 'w') as f:
    f.write(markdown(device, config, rows, flops))
  print(markdown(device, config, rows, flops))


if __name__ == '__main__':
  main()
