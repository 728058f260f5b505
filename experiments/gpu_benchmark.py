r"""Train-step throughput on one GPU, ours and PyTorch's, each row alone.

  python experiments/gpu_benchmark.py --plan=full [--out=experiments/results] \
      [--deadline_s=540] [--steps=10] [--only=SUBSTRING]
  python experiments/gpu_benchmark.py --smoke   # every plan, tiny, any backend
  python experiments/gpu_benchmark.py --list    # the plans and their rows

Divided space-time TimeSformer, bfloat16 compute with float32 parameters,
one full training step (forward, backward and the recipe's SGD update:
Nesterov momentum 0.9, learning rate 0.005, weight decay 1e-4) on random
clips. Each row runs in a subprocess of its own, with a time limit, so that
no framework's allocator or compilation cache sees another's; a row that
fails or runs out of time is recorded as such and the plan goes on. The
tables (`gpu_<device>.md` and `.json` in --out) are written again after
every row, and the run stops starting rows once --deadline_s is spent.

Row kinds:
- `jax`: `train_step_cost.lower_train_step` for an `attention_impl`, a `remat`
  policy (`model.REMAT_POLICIES`) and a named set of XLA flags
  (`XLA_FLAG_SETS`, given to the subprocess as XLA_FLAGS); clips/s over
  the timed steps (after two warm-up steps), XLA's planned peak memory and
  the first step's loss: every variant starts from the same parameters,
  clips and dropout key, so equal losses show unchanged results.
- `torch`: Hugging Face's `TimesformerForVideoClassification` under
  `torch.autocast(bfloat16)`, eager or `torch.compile` (mode 'default' or
  'max-autotune'), with its own attention or with
  `torch.nn.functional.scaled_dot_product_attention` (transformers'
  TimeSformer has no `attn_implementation='sdpa'`, so `sdpa_forward`
  replaces its attention's forward; the tests hold the two equal), the
  same drop path schedule as ours, and SGD with the same settings (fused
  on CUDA); memory is the allocator's peak.
- `profile`: `gpu_profile.profile`, which writes `gpu_profile_<device>.md`.
- `memory`: XLA's memory analysis of one compiled step, nothing run: the
  L row (96 frames, batch 1, `remat='full'`).

Model FLOP utilisation counts 3x the forward FLOPs of XLA's CPU count per
clip (remat's recomputation not counted) against the GPU's dense bfloat16
peak. `--smoke` runs every plan's rows on the tiny config cut to one block,
batches of 2, XLA's quickest compilation and PyTorch compiled with the
'aot_eager' backend (inductor's CPU code generation takes over a minute),
two rows at a time. `experiments/gpu_setup.sh` prepares a GPU machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# Dense bfloat16 tensor-core peaks (vendor figures, without sparsity).
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12}
# Per subprocess. XLA's defaults: autotune level 4, Triton GEMMs on, the
# latency-hiding scheduler off; 'autotune4' thus checks the default level.
XLA_FLAG_SETS = {
    'default': '',
    'lhs': '--xla_gpu_enable_latency_hiding_scheduler=true',
    'no_triton_gemm': '--xla_gpu_enable_triton_gemm=false',
    'autotune4': '--xla_gpu_autotune_level=4',
    'exhaustive_tiling': '--xla_gpu_exhaustive_tiling_search=true',
}
# The profile keeps per-kernel HLO names: no CUDA graphs (command buffers).
PROFILE_XLA_FLAGS = '--xla_gpu_enable_command_buffer='
# --smoke: one block, batches of 2 (the L memory row's 1), XLA's quickest
# compilation, two rows at a time.
SMOKE_BATCH = {1: 1}
SMOKE_XLA_FLAGS = '--xla_backend_optimization_level=0'
SMOKE_JOBS = 2


def peak_flops(device_kind: str) -> float | None:
  return next((v for k, v in PEAK_BF16.items() if k in device_kind), None)


# ------------------------------------------------------------------ plans


def jax_row(batch_size, impl='xla', remat='none', flags='default',
            timeout_s=240, state_dtype='float32'):
  name = f'tsformer_jax ({impl}, remat {remat}'
  name += '' if flags == 'default' else f', XLA flags {flags}'
  name += '' if state_dtype == 'float32' else f', {state_dtype} momentum'
  return dict(kind='jax', name=name + ')', batch_size=batch_size,
              attention_impl=impl, remat=remat, flags=flags,
              state_dtype=state_dtype, variant='base', timeout_s=timeout_s)


def torch_row(batch_size, compile_mode='default', attention='sdpa',
              timeout_s=300):
  how = ('eager' if compile_mode == 'eager'
         else f'torch.compile {compile_mode}')
  attn = 'SDPA' if attention == 'sdpa' else 'HF attention'
  return dict(kind='torch', name=f'HF PyTorch ({how}, {attn})',
              batch_size=batch_size, compile_mode=compile_mode,
              attention=attention, variant='base', timeout_s=timeout_s)


def profile_row(batch_size, impl='xla', timeout_s=200):
  return dict(kind='profile', name=f'profile ({impl})',
              batch_size=batch_size, attention_impl=impl, remat='none',
              variant='base', steps=3, timeout_s=timeout_s)


def memory_row(variant='l', remat='full', batch_size=1, dtype='bfloat16',
               timeout_s=240):
  return dict(kind='memory',
              name=f'memory {variant} (xla, remat {remat}, {dtype})',
              batch_size=batch_size, attention_impl='xla', remat=remat,
              variant=variant, dtype=dtype, timeout_s=timeout_s)


def plans() -> dict[str, list[dict]]:
  """Each plan's rows, most important first (the deadline cuts the tail)."""
  jax32, jax8 = jax_row(32), jax_row(8)
  compiled32, compiled8 = torch_row(32), torch_row(8)
  autotuned32, autotuned8 = (torch_row(b, 'max-autotune', timeout_s=420)
                             for b in (32, 8))
  eager32, eager8 = torch_row(32, 'eager', 'hf'), torch_row(8, 'eager', 'hf')
  eager_sdpa32 = torch_row(32, 'eager', 'sdpa')
  l_memory = memory_row('l', 'full')
  profile, profile_pallas = profile_row(32), profile_row(32, 'pallas')
  pallas32, pallas8 = jax_row(32, 'pallas'), jax_row(8, 'pallas')
  lhs, no_triton, autotune = (jax_row(32, flags=f) for f in (
      'lhs', 'no_triton_gemm', 'autotune4'))
  dots64, none64, full64 = (jax_row(64, remat=r)
                            for r in ('dots', 'none', 'full'))
  auto32 = jax_row(32, 'auto')
  bf16_state64 = jax_row(64, remat='dots', state_dtype='bfloat16')
  exhaustive = jax_row(32, flags='exhaustive_tiling', timeout_s=420)
  return {
      'quick': [jax32, compiled32, profile, l_memory],
      'anchor': [jax32, jax8, compiled32, compiled8, eager32, eager8,
                 autotuned32, autotuned8],
      'variants': [jax32, pallas32, lhs, dots64, none64, no_triton, pallas8,
                   autotune, full64, auto32, bf16_state64, exhaustive],
      'memory': [l_memory, memory_row('l', 'full', dtype='float32'),
                 memory_row('l', 'none'), memory_row('base', 'none', 32),
                 memory_row('base', 'dots', 64)],
      'profile': [profile, profile_pallas],
      'full': [jax32, compiled32, profile, l_memory, jax8, compiled8,
               pallas32, lhs, dots64, none64, no_triton, pallas8, autotune,
               eager32, autotuned32, profile_pallas, eager_sdpa32, full64,
               auto32, bf16_state64, autotuned8, eager8],
  }


def row_key(row: dict) -> str:
  return f'{row["name"]} b{row["batch_size"]}'


def smoke_rows(rows: list[dict]) -> list[dict]:
  """The rows on the tiny config with small batches, duplicates dropped."""
  out, seen = [], set()
  for row in rows:
    row = dict(row, variant='tiny', smoke=True,
               batch_size=SMOKE_BATCH.get(row['batch_size'], 2),
               timeout_s=120, steps=2)
    if row_key(row) not in seen:
      seen.add(row_key(row))
      out.append(row)
  return out


# ---------------------------------------------------------------- workers


def model_config(row: dict):
  from tsformer_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.get_config('divided', row['variant'])
  config.model.dtype = row.get('dtype', 'bfloat16')
  config.model.attention_impl = row.get('attention_impl', 'xla')
  config.model.remat = row.get('remat', 'none')
  config.optimizer.state_dtype = row.get('state_dtype', 'float32')
  if row.get('smoke'):
    config.model.depth = 1
  return config


def _timed(step, steps: int, warmup: int, sync) -> list[float]:
  for _ in range(warmup):
    step()
  sync()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - start)
  return times


def jax_worker(row: dict, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import train_step_cost  # pylint: disable=g-import-not-at-top

  import tsformer_jax  # pylint: disable=g-import-not-at-top

  config, b = model_config(row), row['batch_size']
  start = time.perf_counter()
  compiled = train_step_cost.lower_train_step(config, b).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  peak = None
  if memory:
    peak = (memory.argument_size_in_bytes + memory.temp_size_in_bytes +
            memory.output_size_in_bytes - memory.alias_size_in_bytes)
  params = tsformer_jax.init_params(config, jax.random.key(0))
  state = [params, train_step_cost.train_step(config)[1].init(params)]
  clips = jax.random.normal(jax.random.key(1),
                            tsformer_jax.dummy_clips(config, b).shape)
  labels = jnp.arange(b, dtype=jnp.int32) % config.model.num_classes
  rng = jax.random.key(2)
  losses = []

  def step():
    params, opt_state, loss = compiled(*state, clips, labels, rng)
    state[:] = [params, opt_state]
    losses.append(loss)

  times = _timed(step, steps, 2, lambda: jax.block_until_ready(state))
  return dict(times_s=times, compile_s=compile_s,
              first_loss=float(losses[0]),
              memory_gib=None if peak is None else peak / 2**30,
              temp_gib=(memory.temp_size_in_bytes / 2**30 if memory
                        else None))


def sdpa_forward(self, hidden_states, output_attentions: bool = False):
  """`TimesformerSelfAttention.forward` through PyTorch's fused attention
  (`F.scaled_dot_product_attention`: flash / memory-efficient kernels)."""
  import torch  # pylint: disable=g-import-not-at-top
  b, n, c = hidden_states.shape
  qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads,
                                        c // self.num_heads)
  q, k, v = qkv.permute(2, 0, 3, 1, 4)
  out = torch.nn.functional.scaled_dot_product_attention(
      q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
      scale=self.scale)
  out = out.transpose(1, 2).reshape(b, n, c)
  return (out, None) if output_attentions else (out,)


def hf_model(config, attention: str = 'hf'):
  """Hugging Face's TimeSformer of `config.model` (ours), with our drop
  path schedule, and SDPA attention for `attention='sdpa'`."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import TimesformerConfig  # pylint: disable=g-import-not-at-top
  from transformers import TimesformerForVideoClassification  # pylint: disable=g-import-not-at-top
  from transformers.models.timesformer import modeling_timesformer as hf  # pylint: disable=g-import-not-at-top
  m = config.model
  model = TimesformerForVideoClassification(TimesformerConfig(
      num_labels=m.num_classes, image_size=m.image_size[0],
      patch_size=m.patch_size, num_frames=m.num_frames,
      hidden_size=m.hidden_size, num_hidden_layers=m.depth,
      num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
      layer_norm_eps=m.layer_norm_eps, qkv_bias=True))
  # Its config takes no float drop_path_rate (some releases): set the
  # layers' rates directly, rising linearly to ours as both models do.
  for i, layer in enumerate(model.timesformer.encoder.layer):
    rate = m.drop_path * i / max(1, m.depth - 1)
    layer.drop_path = (hf.TimesformerDropPath(rate) if rate > 0
                       else torch.nn.Identity())
  if attention == 'sdpa':
    for module in model.modules():
      if isinstance(module, hf.TimesformerSelfAttention):
        module.forward = sdpa_forward.__get__(module)
  return model


def torch_worker(row: dict, steps: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import train_step_cost  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  config, b = model_config(row), row['batch_size']
  model = hf_model(config, row['attention']).to(device).train()
  sgd = train_step_cost.torch_sgd(config)
  try:
    opt = torch.optim.SGD(model.parameters(), fused=device == 'cuda', **sgd)
  except (TypeError, RuntimeError):  # Releases without a fused SGD.
    opt = torch.optim.SGD(model.parameters(), **sgd)
  forward = model
  if row['compile_mode'] != 'eager':
    backend = row.get('torch_backend', 'inductor')
    mode = row['compile_mode'] if backend == 'inductor' else None
    forward = torch.compile(model, mode=None if mode == 'default' else mode,
                            backend=backend)
  m = config.model
  pixels = torch.randn(b, m.num_frames, 3, *m.image_size, device=device)
  labels = torch.arange(b, device=device) % m.num_classes
  # max-autotune replays CUDA graphs: a new step begins each iteration.
  mark_step = getattr(torch.compiler, 'cudagraph_mark_step_begin',
                      lambda: None)

  def step():
    mark_step()
    with torch.autocast(device, dtype=torch.bfloat16):
      loss = torch.nn.functional.cross_entropy(forward(pixels).logits,
                                               labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  start = time.perf_counter()
  # Compiles (the first call of a compiled model); a graph's outputs are
  # overwritten by its next replay, so the loss is read now.
  first_loss = float(step().detach())
  sync()
  compile_s = time.perf_counter() - start
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  times = _timed(step, steps, 2, sync)
  return dict(times_s=times, compile_s=compile_s, first_loss=first_loss,
              memory_gib=(torch.cuda.max_memory_allocated() / 2**30
                          if device == 'cuda' else None),
              torch=torch.__version__)


def memory_worker(row: dict) -> dict:
  import train_step_cost  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  sizes = train_step_cost.train_step_memory(model_config(row),
                                            row['batch_size'])
  return dict(compile_s=time.perf_counter() - start,
              **{f'{k}_gib': v / 2**30 for k, v in sizes.items()})


def profile_worker(row: dict, out: str) -> dict:
  import gpu_profile  # pylint: disable=g-import-not-at-top
  command = (f'python experiments/gpu_benchmark.py (row {row_key(row)!r}, '
             f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r})')
  result = gpu_profile.profile(model_config(row), row['batch_size'],
                               row['steps'], None, command)
  suffix = '' if row['attention_impl'] == 'xla' else (
      '_' + row['attention_impl'])
  result['md'] = gpu_profile.write(result, out, suffix=suffix,
                                   json_too=False) + '.md'
  return result


def probe_worker() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return dict(device=jax.devices()[0].device_kind,
              backend=jax.default_backend(), jax=jax.__version__,
              python=platform.python_version())


def flops_worker(row: dict) -> dict:
  """Forward FLOPs per clip, XLA's count compiled for the CPU (on GPUs the
  products become library calls that the cost analysis does not count)."""
  from tsformer_jax import summary  # pylint: disable=g-import-not-at-top
  config = model_config(dict(row, attention_impl='xla'))
  return dict(flops_per_clip=summary.summarize(config)['flops_per_clip'])


def run_worker(spec: dict) -> dict:
  row, kind = spec['row'], spec['row']['kind']
  steps = row.get('steps', spec['steps'])
  if kind == 'jax':
    return jax_worker(row, steps)
  if kind == 'torch':
    return torch_worker(row, steps)
  if kind == 'memory':
    return memory_worker(row)
  if kind == 'profile':
    return profile_worker(row, spec['out'])
  if kind == 'probe':
    return probe_worker()
  if kind == 'flops':
    return flops_worker(row)
  raise ValueError(f'Unknown row kind {kind!r}.')


# ------------------------------------------------------------ subprocesses


def row_env(row: dict, backend: str) -> dict:
  env = dict(os.environ)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join(
      filter(None, [root, os.path.dirname(os.path.abspath(__file__)),
                    env.get('PYTHONPATH')]))
  flags = [env.get('XLA_FLAGS', ''),
           XLA_FLAG_SETS.get(row.get('flags', 'default'), '')]
  if row['kind'] == 'profile' and backend == 'gpu':
    flags.append(PROFILE_XLA_FLAGS)
  if row.get('smoke'):
    flags.append(SMOKE_XLA_FLAGS)
  env['XLA_FLAGS'] = ' '.join(filter(None, flags))
  if row['kind'] == 'flops':
    env['JAX_PLATFORMS'] = 'cpu'
  return env


def launch(row: dict, args, backend: str, timeout_s: float
           ) -> concurrent.futures.Future:
  """Runs `row` in a subprocess (its own session, so that a time-out ends
  PyTorch's compile workers too); the future gives the row's result."""
  fd, result_path = tempfile.mkstemp(prefix='gpu_row_', suffix='.json')
  os.close(fd)
  spec = dict(row=row, steps=args.steps, out=args.out, result=result_path)
  proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), '--worker',
       json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True, env=row_env(row, backend), start_new_session=True)

  def wait() -> dict:
    start = time.perf_counter()
    try:
      output, _ = proc.communicate(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      output, _ = proc.communicate()
      return dict(status=f'timed out after {timeout_s:.0f} s',
                  log_tail=output[-1500:], wall_s=time.perf_counter() - start)
    wall = time.perf_counter() - start
    try:
      with open(result_path) as f:
        result = json.load(f)
      os.remove(result_path)
    except (OSError, ValueError):
      last = [line for line in output.strip().splitlines() if line.strip()]
      return dict(status='failed: ' + (last[-1][:300] if last else
                                       f'exit status {proc.returncode}'),
                  log_tail=output[-3000:], wall_s=wall)
    if 'error' in result:
      return dict(status='failed: ' + result['error'][:300],
                  log_tail=output[-3000:], wall_s=wall)
    return dict(result, status='ok', wall_s=wall)

  pool = concurrent.futures.ThreadPoolExecutor(1)
  future = pool.submit(wait)
  pool.shutdown(wait=False)
  return future


# ----------------------------------------------------------------- tables


def finish_row(row: dict, result: dict, flops: float | None,
               peak: float | None) -> dict:
  row = dict(row, **{k: v for k, v in result.items()})
  times = row.pop('times_s', None)
  if times:
    median = statistics.median(times)
    row.update(step_ms=1e3 * median,
               spread_ms=1e3 * (max(times) - min(times)),
               clips_per_sec=row['batch_size'] / median, times_s=times)
    if flops and peak and row['variant'] == 'base':
      row['mfu'] = 3 * flops * row['clips_per_sec'] / peak
  return row


def _fmt(value, spec: str, none: str = '-') -> str:
  return none if value is None else format(value, spec)


def markdown(meta: dict, rows: list[dict]) -> str:
  lines = [f'# Train-step throughput on {meta["device"]}', '',
           f'`{meta["command"]}` (jax {meta.get("jax", "?")}, '
           f'{meta.get("torch") or "no torch"}, Python {meta["python"]}). '
           'Divided space-time, bfloat16 compute, SGD with Nesterov '
           'momentum and weight decay; each row in its own process; median '
           'of the timed steps (spread = max - min). MFU: 3 x forward FLOPs '
           f'({_fmt(meta.get("forward_flops_per_clip"), ".3e")} per clip, '
           'XLA\'s CPU count) x clips/s / dense bf16 peak '
           f'({_fmt(meta.get("peak_bf16"), ".3g")}). Memory: XLA\'s planned '
           'peak for ours, the allocator\'s peak for PyTorch. First loss: '
           'equal across our variants when results are unchanged.', '',
           '| row | batch | step (ms) | spread (ms) | clips/s | MFU | '
           'memory (GiB) | first loss | compile (s) | status |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if r['kind'] not in ('jax', 'torch'):
      continue
    lines.append(
        f'| {r["name"]} | {r["batch_size"]} | {_fmt(r.get("step_ms"), ".1f")}'
        f' | {_fmt(r.get("spread_ms"), ".1f")} | '
        f'{_fmt(r.get("clips_per_sec"), ".1f")} | '
        f'{_fmt(r.get("mfu") and 100 * r["mfu"], ".1f")}'
        f'{"%" if r.get("mfu") else ""} | '
        f'{_fmt(r.get("memory_gib"), ".2f")} | '
        f'{_fmt(r.get("first_loss"), ".5f")} | '
        f'{_fmt(r.get("compile_s"), ".0f")} | {r["status"]} |')
  memory = [r for r in rows if r['kind'] == 'memory']
  if memory:
    lines += ['', '## Training-step memory (XLA memory analysis, nothing '
              'run)', '', '| config | frames x size | batch | remat | '
              'arguments | temporaries | peak (GiB) | compile (s) | status |',
              '|---|---|---|---|---|---|---|---|---|']
    frames = {'l': '96 x 224', 'base': '8 x 224', 'hr': '16 x 448',
              'tiny': '4 x 32'}
    for r in memory:
      lines.append(
          f'| divided {r["variant"]} | {frames.get(r["variant"], "?")} | '
          f'{r["batch_size"]} | {r["remat"]} | '
          f'{_fmt(r.get("arguments_gib"), ".2f")} | '
          f'{_fmt(r.get("temp_gib"), ".2f")} | '
          f'{_fmt(r.get("peak_gib"), ".2f")} | '
          f'{_fmt(r.get("compile_s"), ".0f")} | {r["status"]} |')
  profiles = [r for r in rows if r['kind'] == 'profile']
  if profiles:
    lines += ['', '## Profiles (share of summed kernel time)', '',
              '| row | batch | wall ms per step | ' +
              ' | '.join(k['kind'] for k in (
                  profiles[0].get('kinds') or [])) + ' | status |',
              '|---|---|---|' + '---|' * len(
                  profiles[0].get('kinds') or []) + '---|']
    for r in profiles:
      shares = ' | '.join(f'{100 * k["share"]:.1f}%'
                          for k in r.get('kinds') or [])
      lines.append(f'| {r["name"]} ({os.path.basename(r.get("md", ""))})'
                   f' | {r["batch_size"]} | '
                   f'{_fmt(r.get("wall_ms_per_step"), ".1f")} | '
                   f'{shares}{" | " if shares else ""}{r["status"]} |')
  return '\n'.join(lines) + '\n'


def write_tables(out: str, meta: dict, rows: list[dict]) -> str:
  os.makedirs(out, exist_ok=True)
  name = os.path.join(out, 'gpu_' + ''.join(
      c if c.isalnum() else '_' for c in meta['device']))
  for suffix, text in (('.json', json.dumps(dict(meta, rows=rows),
                                            indent=2)),
                       ('.md', markdown(meta, rows))):
    with open(name + suffix + '.tmp', 'w') as f:
      f.write(text)
    os.replace(name + suffix + '.tmp', name + suffix)
  return name


# ------------------------------------------------------------------- main


def select_rows(args) -> list[dict]:
  all_plans = plans()
  names = list(all_plans) if args.plan == 'all' else args.plan.split(',')
  unknown = [n for n in names if n not in all_plans]
  if unknown:
    raise SystemExit(f'Unknown plan {unknown}; valid: {sorted(all_plans)} '
                     "or 'all'.")
  rows, seen = [], set()
  for name in names:
    for row in all_plans[name]:
      if row_key(row) not in seen and args.only in row_key(row):
        seen.add(row_key(row))
        rows.append(row)
  if args.smoke:
    rows = smoke_rows(rows)
    for row in rows:
      row['torch_backend'] = 'aot_eager'
  return rows


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--plan', default='full',
                      help="comma-separated plans, or 'all'; --list "
                      'shows them')
  parser.add_argument('--out', default=None,
                      help='default experiments/results (--smoke: a '
                      'temporary directory)')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--deadline_s', type=float, default=520,
                      help='start no row after this; rows get at most what '
                      'is left')
  parser.add_argument('--only', default='',
                      help='rows whose name contains this')
  parser.add_argument('--smoke', action='store_true',
                      help="every plan's rows on the tiny config, small "
                      'batches, 2 steps: any backend, well under a minute')
  parser.add_argument('--resume', default=None,
                      help="an earlier run's json: its 'ok' rows are kept "
                      'and not run again (same device only)')
  parser.add_argument('--list', action='store_true')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.smoke:
    args.plan = 'all' if args.plan == 'full' else args.plan
    args.steps = 2
  return args


def worker_main(spec: dict):
  """Runs one row in this (sub)process; its result goes to a json file."""
  try:
    result = run_worker(spec)
  except Exception as e:  # pylint: disable=broad-except
    # The parent records the error's first line; the traceback follows.
    with open(spec['result'], 'w') as f:
      json.dump(dict(error=f'{type(e).__name__}: {e}'.splitlines()[0]), f)
    raise
  with open(spec['result'], 'w') as f:
    json.dump(result, f)


def main():
  args = parse_args()
  if args.worker:
    worker_main(json.loads(args.worker))
    return
  if args.list:
    for name, rows in plans().items():
      print(f'{name}:')
      for r in rows:
        print(f'  {row_key(r)} (limit {r["timeout_s"]} s)')
    return
  args.out = args.out or (tempfile.mkdtemp(prefix='gpu_benchmark_')
                          if args.smoke else 'experiments/results')
  rows = select_rows(args)
  start = time.perf_counter()
  left = lambda: args.deadline_s - (time.perf_counter() - start)

  probe = launch(dict(kind='probe'), args, 'unknown', 120).result()
  if probe['status'] != 'ok':
    raise SystemExit(f'The probe failed: {probe["status"]}\n'
                     f'{probe.get("log_tail", "")}')
  backend = probe['backend']
  variant = 'tiny' if args.smoke else 'base'
  # On the CPU, beside the first rows: it never touches the GPU.
  flops_future = launch(dict(kind='flops', variant=variant,
                             smoke=args.smoke), args, backend, 300)
  meta = run_meta(probe)
  print(f'{probe["device"]} ({backend}), {len(rows)} rows, deadline '
        f'{args.deadline_s:.0f} s', flush=True)
  done = resumed_rows(args.resume, probe['device'], rows)
  kept = {row_key(r) for r in done}
  pending = [r for r in rows if row_key(r) not in kept]
  jobs = SMOKE_JOBS if args.smoke else 1
  running: dict[concurrent.futures.Future, dict] = {}
  while pending or running:
    while pending and len(running) < jobs:
      row = pending.pop(0)
      budget = min(row['timeout_s'], left())
      if budget < 15:
        done.append(dict(row, status='not run: out of time'))
        continue
      print(f'[{time.perf_counter() - start:5.0f} s] {row_key(row)} '
            f'(limit {budget:.0f} s)', flush=True)
      running[launch(row, args, backend, budget)] = row
    if not running:
      break
    finished, _ = concurrent.futures.wait(
        running, return_when=concurrent.futures.FIRST_COMPLETED)
    if flops_future.done() and meta['forward_flops_per_clip'] is None:
      meta['forward_flops_per_clip'] = flops_future.result().get(
          'flops_per_clip')
    for future in finished:
      row = running.pop(future)
      result = future.result()
      done.append(finish_row(row, result, meta['forward_flops_per_clip'],
                             meta['peak_bf16']))
      r = done[-1]
      print(f'  {row_key(r)}: {r["status"]}: ' + ', '.join(
          f'{k} {r[k]:.4g}' for k in ('clips_per_sec', 'step_ms', 'mfu',
                                      'memory_gib', 'peak_gib', 'first_loss',
                                      'compile_s', 'wall_s')
          if isinstance(r.get(k), float)), flush=True)
      if r['status'] != 'ok':
        print('  ' + r.get('log_tail', '')[-800:].replace('\n', '\n  '),
              flush=True)
      write_tables(args.out, meta, _ordered(done, rows))
  flops = flops_future.result()
  meta['forward_flops_per_clip'] = flops.get('flops_per_clip')
  done = [finish_row(r, {}, meta['forward_flops_per_clip'],
                     meta['peak_bf16']) for r in done]
  name = write_tables(args.out, meta, _ordered(done, rows))
  print(markdown(meta, _ordered(done, rows)))
  print(f'Wrote {name}.md and .json in {time.perf_counter() - start:.0f} s')


def run_meta(probe: dict) -> dict:
  """What the tables say of the run: device, versions, command, peak."""
  try:
    torch_version = importlib.metadata.version('torch')
  except importlib.metadata.PackageNotFoundError:
    torch_version = None
  return dict(device=probe['device'], backend=probe['backend'],
              jax=probe['jax'],
              torch=f'torch {torch_version}' if torch_version else None,
              python=probe['python'], peak_bf16=peak_flops(probe['device']),
              forward_flops_per_clip=None,
              command='python experiments/gpu_benchmark.py ' + ' '.join(
                  sys.argv[1:]))


def resumed_rows(path: str | None, device: str, rows: list[dict]
                 ) -> list[dict]:
  """The rows of `rows` that the run in `path` measured on `device`."""
  if not path:
    return []
  with open(path) as f:
    earlier = json.load(f)
  if earlier.get('device') != device:
    print(f'--resume: {path} ran on {earlier.get("device")}, not {device}: '
          'nothing kept', flush=True)
    return []
  wanted = {row_key(r) for r in rows}
  kept = [r for r in earlier['rows']
          if r.get('status') == 'ok' and row_key(r) in wanted]
  print(f'--resume: {len(kept)} rows kept from {path}', flush=True)
  return kept


def _ordered(done: list[dict], rows: list[dict]) -> list[dict]:
  """The finished rows in the plan's order."""
  order = {row_key(r): i for i, r in enumerate(rows)}
  return sorted(done, key=lambda r: order.get(row_key(r), len(order)))


if __name__ == '__main__':
  main()
