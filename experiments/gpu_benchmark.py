r"""Train-step throughput and model FLOP utilisation on one GPU.

  python experiments/gpu_benchmark.py [--out=experiments/results] \
      [--batch_sizes=8,32] [--steps=10] \
      [--jax_variants=auto:none,xla:none,xla:full,xla:dots,xla:dots_no_batch]
  python experiments/gpu_benchmark.py --smoke   # tiny model, any backend

Divided space-time TimeSformer at the base size (8 x 224), bfloat16 compute
with float32 parameters, SGD with momentum: clips per second of a full
training step (forward, backward, update) for each batch size, for our model
in each `attention_impl:remat` variant (cuDNN's fused attention 'auto' or
XLA's 'xla'; block rematerialisation 'none', 'full', 'dots' or
'dots_no_batch', see `model.REMAT_POLICIES`) with the temporary memory XLA
plans for the step, and for Hugging Face's PyTorch TimeSformer under
`torch.autocast(bfloat16)` where torch with CUDA is installed. Model FLOP
utilisation counts 3x the forward FLOPs of XLA's cost analysis per clip
(forward + backward; remat's recomputation is not counted) against the
GPU's dense bfloat16 peak. Writes `gpu_<device>.json` and `.md` to --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import tempfile
import time

# JAX would otherwise take most of the GPU at start and leave PyTorch's rows
# none; it allocates as it goes instead.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax
import jax.numpy as jnp

import tsformer_jax
from tsformer_jax import config_lib
from tsformer_jax import kernels
from tsformer_jax import model as model_lib
from tsformer_jax import summary

# Dense bfloat16 tensor-core peaks (vendor figures, without sparsity).
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12}


def peak_flops(device_kind: str) -> float | None:
  return next((v for k, v in PEAK_BF16.items() if k in device_kind), None)


def forward_flops(config) -> float:
  """XLA's count for one clip's forward pass, compiled for the CPU: on GPUs
  the matmuls become cuBLAS calls that the cost analysis does not count."""
  config = config.copy_and_resolve_references()
  # 'auto' would pick cuDNN's kernel, which has no CPU lowering.
  config.model.attention_impl = 'xla'
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


def compile_all(lowered: dict) -> dict:
  """Compiles the lowered steps `{(impl, remat, batch): lowered}`.

  Compilation, not the timed steps, is most of this benchmark's time. The
  first step of each batch size compiles alone, so that GPU autotuning
  measures its kernels undisturbed and fills the process's autotuning
  cache; the others, which share most kernels with it, then compile in
  parallel threads (XLA compiles outside the GIL).
  """
  first = {}
  for key in lowered:
    first.setdefault(key[-1], key)
  compiled = {key: lowered[key].compile() for key in first.values()}
  rest = [key for key in lowered if key not in compiled]
  workers = max(1, min(len(rest), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {key: pool.submit(lowered[key].compile) for key in rest}
    compiled.update({key: f.result() for key, f in futures.items()})
  return {key: compiled[key] for key in lowered}


def jax_train_step_times(compiled, config, params, clips_shape,
                         steps: int) -> tuple[list[float], int]:
  """Seconds per step of a compiled `summary.lower_sgd_train_step` on random
  clips of `clips_shape`, and the temporary bytes XLA plans for it. `params` are
  copied: the step consumes its state."""
  clips = jax.random.normal(jax.random.key(1), clips_shape)
  labels = jnp.arange(clips_shape[0],
                      dtype=jnp.int32) % config.model.num_classes
  rng = jax.random.key(2)
  tx = summary.sgd_train_step(config)[1]
  state = (jax.tree.map(jnp.copy, params), tx.init(params))

  def step(state, batch):
    params, opt_state, _ = compiled(*state, *batch, rng)
    return params, opt_state

  memory = compiled.memory_analysis()
  temp = int(memory.temp_size_in_bytes) if memory else 0
  return time_steps(step, state, (clips, labels), steps), temp


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


def row(name, batch_size, times, flops_per_clip, peak,
        temp_bytes: int | None = None) -> dict:
  median = statistics.median(times)
  clips_per_sec = batch_size / median
  return dict(model=name, batch_size=batch_size,
              step_ms=1e3 * median,
              spread_ms=1e3 * (max(times) - min(times)),
              clips_per_sec=clips_per_sec,
              mfu=(3 * flops_per_clip * clips_per_sec / peak
                   if peak else None),
              temp_gib=None if temp_bytes is None else temp_bytes / 2**30)


def parse_variants(value: str) -> list[tuple[str, str]]:
  """'auto:none,xla:full' -> [('auto', 'none'), ('xla', 'full')]."""
  variants = []
  for item in filter(None, value.split(',')):
    impl, _, remat = item.partition(':')
    remat = remat or 'none'
    if impl not in kernels.IMPLEMENTATIONS:
      raise SystemExit(f'Unknown attention_impl {impl!r} in {item!r}; '
                       f'valid: {kernels.IMPLEMENTATIONS}.')
    if remat not in model_lib.REMAT_POLICIES:
      raise SystemExit(f'Unknown remat {remat!r} in {item!r}; valid: '
                       f'{sorted(model_lib.REMAT_POLICIES)}.')
    variants.append((impl, remat))
  return variants


def markdown(device: str, config, rows: list[dict], flops: float) -> str:
  m = config.model
  lines = [f'# Train-step throughput on {device}', '',
           f'Divided space-time, {m.num_frames} x {m.image_size[0]}, '
           'bfloat16 compute, SGD; median of '
           'the timed steps (spread = max - min). MFU: 3 x forward FLOPs '
           f'({flops:.3e} per clip, XLA count) x clips/s / dense bf16 peak '
           '(remat\'s recomputation not counted). XLA temp: the temporary '
           'memory XLA plans for the step (activations and scratch).',
           '', '| model | batch | step (ms) | spread (ms) | clips/s | MFU | '
           'XLA temp (GiB) |', '|---|---|---|---|---|---|---|']
  for r in rows:
    mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '-'
    temp = f'{r["temp_gib"]:.2f}' if r.get('temp_gib') is not None else '-'
    lines.append(f'| {r["model"]} | {r["batch_size"]} | {r["step_ms"]:.1f} | '
                 f'{r["spread_ms"]:.1f} | {r["clips_per_sec"]:.1f} | {mfu} | '
                 f'{temp} |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=None,
                      help='default experiments/results (--smoke: a '
                      'temporary directory)')
  parser.add_argument('--batch_sizes', default='8,32')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--jax_variants',
                      default='auto:none,xla:none,xla:full,xla:dots,'
                      'xla:dots_no_batch',
                      help='attention_impl:remat pairs; empty: no jax rows')
  parser.add_argument('--skip_torch', action='store_true')
  parser.add_argument('--variant', default='base',
                      help="config variant ('tiny' for a quick CPU check)")
  parser.add_argument('--smoke', action='store_true',
                      help='tiny model, batch 2, 2 steps: checks the script '
                      'end to end on any backend in seconds')
  args = parser.parse_args()
  if args.smoke:
    args.variant, args.batch_sizes, args.steps = 'tiny', '2', 2
  out = args.out or (tempfile.mkdtemp(prefix='gpu_benchmark_')
                     if args.smoke else 'experiments/results')
  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  variants = parse_variants(args.jax_variants)
  device = jax.devices()[0].device_kind
  peak = peak_flops(device)
  config = config_lib.get_config('divided', args.variant)
  config.model.dtype = 'bfloat16'
  flops = forward_flops(config)
  lowered = {}
  for impl, remat in variants:
    config.model.attention_impl, config.model.remat = impl, remat
    for b in batch_sizes:
      lowered[impl, remat, b] = summary.lower_sgd_train_step(config, b)
  start = time.perf_counter()
  compiled = compile_all(lowered)
  print(f'compiled {len(compiled)} training steps in '
        f'{time.perf_counter() - start:.0f} s', flush=True)
  params = tsformer_jax.init_params(config, jax.random.key(0))
  rows = []
  for (impl, remat, b), step in compiled.items():
    times, temp = jax_train_step_times(
        step, config, params, tsformer_jax.dummy_clips(config, b).shape,
        args.steps)
    rows.append(row(f'tsformer_jax ({impl}, remat {remat})', b, times,
                    flops, peak, temp))
    print(rows[-1], flush=True)
  for b in [] if args.skip_torch or args.smoke else batch_sizes:
    times = torch_train_step_times(b, args.steps)
    if times is not None:
      rows.append(row('HF PyTorch (autocast bf16)', b, times, flops, peak))
      print(rows[-1], flush=True)
  os.makedirs(out, exist_ok=True)
  name = 'gpu_' + ''.join(c if c.isalnum() else '_' for c in device)
  with open(os.path.join(out, name + '.json'), 'w') as f:
    json.dump(dict(device=device, jax=jax.__version__,
                   python=platform.python_version(), peak_bf16=peak,
                   forward_flops_per_clip=flops, rows=rows), f, indent=2)
  with open(os.path.join(out, name + '.md'), 'w') as f:
    f.write(markdown(device, config, rows, flops))
  print(markdown(device, config, rows, flops))
  print(f'Wrote {os.path.join(out, name)}.md and .json')


if __name__ == '__main__':
  main()
