r"""CPU speed of tsformer_jax against Hugging Face's PyTorch TimeSformer.

  python experiments/benchmark_cpu.py [--schemes=divided,joint,space_only] \
      [--sizes=base,small] [--batch_sizes=1,4] [--dtypes=float32,bfloat16] \
      [--modes=forward,train] [--reps=3] [--out=experiments/results]

One process, one thread count for both frameworks (the CPUs this process
may run on: `taskset -c 0,1 python ...` benchmarks two cores). For every
scheme x size x dtype x batch x mode it times our model and Hugging Face's
`TimesformerForVideoClassification` (built from a config with random
weights, nothing downloaded), alternating the two rep by rep so that a
shared machine's noise falls on both alike; warm-up (and compilation) is
excluded, and each row gives the median and the spread (max - min).

- forward: inference, `train=False` / `torch.inference_mode()`.
- train: one full SGD step (`train_step_cost`: the recipe's Nesterov
  momentum 0.9 and weight decay, as `torch.optim.SGD`): forward, backward and
  update, dropout and stochastic depth off in both (transformers rejects a
  float `drop_path_rate`). HF's space_only classifies each frame; its
  per-frame logits are averaged for the loss.
- float32, or bfloat16: ours with `config.model.dtype='bfloat16'` (float32
  parameters, bfloat16 compute), theirs under
  `torch.autocast('cpu', dtype=torch.bfloat16)`.

The same run measures the matrix-product ceilings of both frameworks in both
dtypes, at its start and at its end, keeping the best (an n x n x n
product; n is 2048 unless a product would take over a second, e.g. where
bfloat16 has no hardware support), and reports each
model's achieved FLOP/s as a fraction of its framework's ceiling in that
dtype. Model FLOPs per clip are XLA's cost analysis of our compiled forward
pass (two per multiply-add, as in `tsformer_jax.summary`), 3x that for a
training step; the same count is used for both models, which compute the
same network.

A case predicted (from its FLOPs and the ceiling) to take longer than
--max_seconds per call, or whose first call does, or predicted to need
more memory than is available (XLA's memory analysis of our compiled
step), is skipped and listed as such.
Writes `cpu.md` and `cpu.json` to --out after every case; the same command
with `--resume` continues a stopped run, keeping the cases it finished.

XLA CPU flags go in the environment, e.g.
`XLA_FLAGS=--xla_cpu_enable_fast_math=true python ...`; the run records
them.

Memory allocator: glibc hands every freed block over 32 MiB back to the
kernel, and XLA allocates a step's temporaries as one block (2.7 GiB for a
base training step), so each step faults all its pages back in, zeroed:
700,000 page faults and 2-10 s of kernel time per base training step, the
more the busier the machine's memory. With `--malloc=retain` (the default)
the script restarts itself under `MALLOC_TUNABLES` (one arena that neither
maps nor trims, so freed memory is reused), for both frameworks alike;
`--malloc=default` keeps glibc's defaults. A training run on CPU gains the
same from `GLIBC_TUNABLES=<MALLOC_TUNABLES> python -m tsformer_jax.main`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import ctypes
import functools
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import train_step_cost

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import config_lib

# Model sizes beside the paper's base (8 x 224, ViT-B/16).
SIZES = {
    'base': {},
    # ViT-S/16 width on 8 frames of 112 x 112: about 1/16 of base's FLOPs.
    'small': dict(hidden_size=384, num_heads=6, mlp_dim=1536,
                  image_size=(112, 112)),
}
SCHEMES = tuple(checkpoints.TORCH_SCHEMES)  # Those that HF implements.
HF_NAMES = {ours: hf for hf, ours in checkpoints.HF_ATTENTION_TYPES.items()}
DTYPES = ('float32', 'bfloat16')
MODES = ('forward', 'train')
FRAMEWORKS = ('jax', 'torch')
MALLOC_TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
                   'glibc.malloc.trim_threshold=68719476736')


def model_config(scheme: str, size: str, dtype: str):
  """Our config of `scheme` at `size`, computing in `dtype`."""
  if size not in SIZES:
    raise ValueError(f'Unknown size {size!r}; valid: {sorted(SIZES)}.')
  config = config_lib.get_config(scheme, 'base')
  config.model.update(SIZES[size])
  config.model.dtype = dtype
  config.model.drop_path = 0.0
  return config


def hf_model(config):
  """Hugging Face's TimeSformer of the same shape, random weights."""
  from transformers import TimesformerConfig  # pylint: disable=g-import-not-at-top
  from transformers import TimesformerForVideoClassification  # pylint: disable=g-import-not-at-top
  m = config.model
  if m.image_size[0] != m.image_size[1]:
    raise ValueError(f'Hugging Face needs square frames, got {m.image_size}.')
  return TimesformerForVideoClassification(TimesformerConfig(
      attention_type=HF_NAMES[m.attention], num_frames=m.num_frames,
      image_size=m.image_size[0], patch_size=m.patch_size,
      hidden_size=m.hidden_size, num_hidden_layers=m.depth,
      num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
      num_labels=m.num_classes, layer_norm_eps=m.layer_norm_eps,
      drop_path_rate=0))


def _clips(config, batch_size: int) -> np.ndarray:
  """Random clips `[B, T, H, W, 3]` (float32)."""
  shape = (batch_size,) + tsformer_jax.dummy_clips(config).shape[1:]
  return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def _labels(config, batch_size: int) -> np.ndarray:
  return np.arange(batch_size) % config.model.num_classes


def jax_runner(config, batch_size: int, mode: str,
               compiler_options: dict[str, str] | None = None
               ) -> tuple[Callable[[], None], float, int]:
  """A call that runs one forward or train step and waits for it, compiled
  under `compiler_options` (None: as the package compiles it, forward
  under `tsformer_jax.inference_compiler_options`, train step under XLA's
  defaults).

  Returns:
    `(run, flops_per_clip, temp_bytes)`: XLA's count for one clip's forward
    pass and the temporary memory of the compiled step.
  """
  model = tsformer_jax.create_model(config)
  params = tsformer_jax.init_params(config, jax.random.key(0))
  clips = jnp.asarray(_clips(config, batch_size))
  forward = jax.jit(
      lambda p, x: model.apply({'params': p}, x),
      compiler_options=(tsformer_jax.inference_compiler_options(
                            config, batch_size)
                        if compiler_options is None else compiler_options))
  compiled = forward.lower(params, clips).compile()
  flops = _first(compiled.cost_analysis())['flops'] / batch_size
  if mode == 'forward':
    memory = compiled.memory_analysis()

    def run():
      compiled(params, clips).block_until_ready()
    return run, flops, int(memory.temp_size_in_bytes) if memory else 0

  _, tx = train_step_cost.train_step(config)
  labels = jnp.asarray(_labels(config, batch_size))
  rng = jax.random.key(1)
  compiled = train_step_cost.lower_train_step(config, batch_size,
                                              compiler_options).compile()
  memory = compiled.memory_analysis()
  holder = [(params, tx.init(params))]

  def run():
    params, opt_state, _ = compiled(*holder[0], clips, labels, rng)
    holder[0] = jax.block_until_ready((params, opt_state))
  return run, flops, int(memory.temp_size_in_bytes) if memory else 0


def _first(analysis):
  # Older jax versions return one dict per computation in a list.
  return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def torch_runner(config, batch_size: int, mode: str) -> Callable[[], None]:
  """Like `jax_runner` for Hugging Face's model (pixels `[B, T, 3, H, W]`)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = hf_model(config)
  pixels = torch.from_numpy(_clips(config, batch_size)).permute(
      0, 1, 4, 2, 3).contiguous()
  autocast = functools.partial(
      torch.autocast, 'cpu', dtype=torch.bfloat16,
      enabled=config.model.dtype == 'bfloat16')
  if mode == 'forward':
    model.eval()

    def run():
      with torch.inference_mode(), autocast():
        model(pixels)
    return run

  model.train()
  labels = torch.from_numpy(_labels(config, batch_size))
  opt = torch.optim.SGD(model.parameters(),
                        **train_step_cost.torch_sgd(config))

  def run():
    with autocast():
      logits = model(pixels).logits
      # HF's space_only classifies every frame: [B * T, classes].
      logits = logits.reshape(batch_size, -1, logits.shape[-1]).mean(1)
      loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
  return run


def interleaved_times(runners: dict[str, Callable[[], None]], reps: int,
                      warmup: int = 1) -> dict[str, list[float]]:
  """Seconds per call of each runner, taking turns rep by rep.

  Each turn starts with `warmup` untimed calls, so that every timed call
  follows a call of its own framework, as in a training loop: the first
  call after the other framework's finds its caches, and the memory the
  allocator had kept for it, taken by the other (up to 1 s slower per
  training step of the base model).
  """
  times = {name: [] for name in runners}
  for _ in range(reps):
    for name, run in runners.items():
      for _ in range(warmup):
        run()
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return times


def calls_over(runners: dict[str, Callable[[], None]], max_seconds: float
               ) -> dict[str, str]:
  """Times one call of each runner: why those over `max_seconds` are skipped.

  The prediction from FLOPs assumes the product ceiling, which emulated
  dtypes' training steps fall far short of (PyTorch's bfloat16 step on a
  CPU without bfloat16 units: a fifth of it or less, minutes per call), so
  one real call decides. It also warms the runner up.
  """
  slow = {}
  for name, run in runners.items():
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    if seconds > max_seconds:
      slow[name] = f'one call took {seconds:.0f} s (> --max_seconds)'
  return slow


def _best_seconds(run: Callable[[], None], reps: int) -> float:
  """The fastest of `reps` calls after one warm-up: a ceiling, not a norm."""
  run()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def _matmul_size(probe: Callable[[int], Callable[[], None]],
                 largest: int = 2048, budget_s: float = 1.0) -> int:
  """The largest power-of-two n <= largest whose product fits the budget,
  judged from a 256 x 256 probe (slow emulated dtypes get small n)."""
  seconds = _best_seconds(probe(256), reps=3)
  n = largest
  while n > 256 and seconds * (n / 256) ** 3 > budget_s:
    n //= 2
  return n


def matmul_ceilings(reps: int = 5) -> dict[str, dict]:
  """FLOP/s of an n x n x n product per framework and dtype (the best of
  `reps`: on a shared machine the fastest product is the least disturbed).

  `jax bfloat16` multiplies bfloat16 inputs with float32 accumulation
  (`preferred_element_type`), the form XLA's fast kernels take; a plain
  bfloat16 x bfloat16 -> bfloat16 product is reported as
  `jax bfloat16->bfloat16`. PyTorch's products are `linear` layers, in
  bfloat16 under CPU autocast, as in the models.
  """
  import torch  # pylint: disable=g-import-not-at-top

  def jax_probe(dtype, accumulate):
    def make(n):
      a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
      dot = jax.jit(functools.partial(jnp.dot,
                                      preferred_element_type=accumulate))
      return lambda: dot(a, a).block_until_ready()
    return make

  def torch_probe(dtype):
    # As the models run: float32 tensors, bfloat16 under CPU autocast.
    autocast = functools.partial(torch.autocast, 'cpu', dtype=torch.bfloat16,
                                 enabled=dtype == torch.bfloat16)

    def make(n):
      a = torch.randn(n, n)

      def run():
        with torch.inference_mode(), autocast():
          torch.nn.functional.linear(a, a)
      return run
    return make

  probes = {
      'jax float32': jax_probe(jnp.float32, jnp.float32),
      'jax bfloat16': jax_probe(jnp.bfloat16, jnp.float32),
      'jax bfloat16->bfloat16': jax_probe(jnp.bfloat16, jnp.bfloat16),
      'torch float32': torch_probe(torch.float32),
      'torch bfloat16': torch_probe(torch.bfloat16),
  }
  result = {}
  for name, probe in probes.items():
    n = _matmul_size(probe)
    seconds = _best_seconds(probe(n), reps)
    result[name] = dict(n=n, flops_per_s=2 * n**3 / seconds)
    print(f'matmul ceiling {name}: n={n} '
          f'{result[name]["flops_per_s"] / 1e9:.1f} GFLOP/s', flush=True)
  return result


def ceiling(ceilings: dict[str, dict], framework: str, dtype: str) -> float:
  """The best product rate of `framework` in `dtype` (FLOP/s)."""
  names = [f'{framework} {dtype}']
  if framework == 'jax' and dtype == 'bfloat16':
    names.append('jax bfloat16->bfloat16')
  return max(ceilings[n]['flops_per_s'] for n in names if n in ceilings)


def restart_retaining_memory() -> None:
  """Restarts this process under `MALLOC_TUNABLES` unless it already runs
  under them (Linux; glibc reads them at process start only)."""
  if (sys.platform == 'linux' and
      os.environ.get('GLIBC_TUNABLES') != MALLOC_TUNABLES):
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def release_free_heap() -> None:
  """Hands the memory glibc's malloc keeps free back to the kernel.

  Under `--malloc=retain` freed memory is never returned by itself: steps
  of one case reuse it, but a later, larger case would add its own on top
  (the heap's free pieces need not hold XLA's one large block) and run out.
  """
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass  # Not glibc: nothing is retained.


def _available_bytes() -> int:
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  return 0


# How `benchmark_case` starts the reason of a case skipped for memory.
MEMORY_SKIP = 'needs ~'


def benchmark_case(scheme, size, dtype, batch_size, mode, *, reps, ceilings,
                   max_seconds) -> dict:
  """Times both frameworks on one case; returns its row (or why skipped)."""
  config = model_config(scheme, size, dtype)
  case = dict(scheme=scheme, size=size, dtype=dtype, batch_size=batch_size,
              mode=mode)
  jax_run, flops, temp_bytes = jax_runner(config, batch_size, mode)
  model_flops = flops * (3 if mode == 'train' else 1) * batch_size
  case.update(flops_per_clip=flops, jax_temp_bytes=temp_bytes)
  skipped = {}
  # Both frameworks' steps stay in memory while they take turns.
  release_free_heap()
  available = _available_bytes()
  for framework in FRAMEWORKS:
    # PyTorch's peak over XLA's plan for the same base training step at
    # batch 1: 1.04x divided, 1.51x joint (`cpu_attention` keeps less).
    # The larger, so that no case runs out of memory mid-run.
    needed = temp_bytes * (1.5 if framework == 'torch' else 1.0)
    predicted = model_flops / ceiling(ceilings, framework, dtype)
    # Time first: unlike memory, it does not depend on the moment.
    if predicted > max_seconds:
      skipped[framework] = (f'predicted {predicted:.0f} s per call at the '
                            f'{dtype} matmul ceiling (> --max_seconds)')
    elif needed > available:
      skipped[framework] = (f'{MEMORY_SKIP}{needed / 2**30:.1f} GiB, '
                            f'{available / 2**30:.1f} GiB available')
    else:
      available -= needed
  runners = {}
  if 'jax' not in skipped:
    runners['jax'] = jax_run
  if 'torch' not in skipped:
    runners['torch'] = torch_runner(config, batch_size, mode)
  skipped.update(calls_over(runners, max_seconds))
  runners = {k: run for k, run in runners.items() if k not in skipped}
  times = interleaved_times(runners, reps) if runners else {}
  for framework in FRAMEWORKS:
    if framework in skipped:
      case[framework] = dict(skipped=skipped[framework])
      continue
    t = times[framework]
    median = statistics.median(t)
    achieved = model_flops / median
    case[framework] = dict(
        times_s=t, median_s=median, spread_s=max(t) - min(t),
        clips_per_s=batch_size / median, flops_per_s=achieved)
  if 'median_s' in case['jax'] and 'median_s' in case['torch']:
    case['speedup'] = case['torch']['median_s'] / case['jax']['median_s']
  return case


def merge_ceilings(*runs: dict[str, dict]) -> dict[str, dict]:
  """The best of several `matmul_ceilings` runs, name by name."""
  return {name: max((run[name] for run in runs),
                    key=lambda c: c['flops_per_s'])
          for name in runs[0]}


def add_fractions(cases: list[dict], ceilings: dict[str, dict]) -> None:
  """Sets each timed result's `ceiling_fraction` (achieved / ceiling)."""
  for case in cases:
    for framework in FRAMEWORKS:
      result = case[framework]
      if 'flops_per_s' in result:
        result['ceiling_fraction'] = result['flops_per_s'] / ceiling(
            ceilings, framework, case['dtype'])


def environment() -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cpu, flags = platform.processor(), []
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
    cpu = next((line.split(':', 1)[1].strip() for line in info.splitlines()
                if line.startswith('model name')), cpu)
    present = set(info.split())
    flags = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16',
                         'amx_tile') if f in present]
  except OSError:
    pass
  return dict(cpu=cpu, isa_flags=flags, threads=torch.get_num_threads(),
              jax=jax.__version__, torch=torch.__version__,
              transformers=transformers.__version__,
              python=platform.python_version(),
              xla_flags=os.environ.get('XLA_FLAGS', ''),
              glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
              load_average=os.getloadavg())


def _cell(result: dict) -> str:
  if 'skipped' in result:
    return 'skipped'
  return (f'{result["clips_per_s"]:.3g} ({1e3 * result["median_s"]:.0f} '
          f'± {1e3 * result["spread_s"] / 2:.0f} ms)')


def _fraction(result: dict) -> str:
  if 'skipped' in result:
    return '-'
  return f'{100 * result["ceiling_fraction"]:.0f}%'


# A case's command, where its run did not record one.
NO_COMMAND = 'an earlier run that did not record its command'


def _table_order(case: dict) -> tuple:
  """Size, dtype, scheme, mode, batch: one table for runs in any order."""
  return (list(SIZES).index(case['size']), DTYPES.index(case['dtype']),
          SCHEMES.index(case['scheme']), MODES.index(case['mode']),
          case['batch_size'])


def markdown(env: dict, ceilings: dict, cases: list[dict]) -> str:
  cases = sorted(cases, key=_table_order)
  # A resumed run keeps earlier runs' cases: each row names its command.
  commands = list(dict.fromkeys(c.get('command', NO_COMMAND) for c in cases))
  lines = [
      '# CPU: tsformer_jax against Hugging Face PyTorch', '',
      'Runs (the last column of the table below):', '']
  lines += [f'{i}. `{command}`' if command != NO_COMMAND else
            f'{i}. {command}' for i, command in enumerate(commands, 1)]
  lines += [
      '',
      f'{env["cpu"]} ({", ".join(env["isa_flags"]) or "no AVX2"}), '
      f'{env["threads"]} threads for both; jax {env["jax"]}, torch '
      f'{env["torch"]}, transformers {env["transformers"]}; XLA_FLAGS '
      f'`{env["xla_flags"] or "(none)"}`; GLIBC_TUNABLES '
      f'`{env.get("glibc_tunables") or "(none)"}`; load average at the '
      f'start {env["load_average"][0]:.1f}.', '',
      '## Matrix-product ceilings (n x n x n)', '',
      '| framework, dtype | n | GFLOP/s |', '|---|---|---|']
  for name, c in ceilings.items():
    lines.append(f'| {name} | {c["n"]} | {c["flops_per_s"] / 1e9:.1f} |')
  lines += [
      '', '## Models', '',
      'clips/s (median time per call ± half the spread); speedup = '
      'PyTorch time / ours (> 1: ours faster); % = achieved FLOP/s '
      '(XLA count, 3x forward for a train step) of the framework\'s '
      'product ceiling in that dtype.', '',
      '| scheme | size | dtype | batch | mode | ours clips/s | PyTorch '
      'clips/s | speedup | ours % | PyTorch % | run |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  notes = []
  for c in cases:
    speedup = f'{c["speedup"]:.2f}x' if 'speedup' in c else '-'
    lines.append(
        f'| {c["scheme"]} | {c["size"]} | {c["dtype"]} | {c["batch_size"]} '
        f'| {c["mode"]} | {_cell(c["jax"])} | {_cell(c["torch"])} | '
        f'{speedup} | {_fraction(c["jax"])} | {_fraction(c["torch"])} | '
        f'{commands.index(c.get("command", NO_COMMAND)) + 1} |')
    for framework in FRAMEWORKS:
      if 'skipped' in c[framework]:
        notes.append(f'- {c["scheme"]} {c["size"]} {c["dtype"]} batch '
                     f'{c["batch_size"]} {c["mode"]}, {framework}: '
                     f'{c[framework]["skipped"]}.')
  if notes:
    lines += ['', 'Skipped:', ''] + notes
  return '\n'.join(lines) + '\n'


def case_key(case: dict) -> tuple:
  return tuple(case[k] for k in ('scheme', 'size', 'dtype', 'batch_size',
                                 'mode'))


def save_run(out: str, name: str, env: dict, ceilings: dict,
             cases: list[dict]) -> str:
  """Writes NAME.md and NAME.json (after every case, so that a stopped run
  keeps what it measured); returns the markdown."""
  add_fractions(cases, ceilings)
  text = markdown(env, ceilings, cases)
  write_results(out, name, text,
                dict(environment=env, ceilings=ceilings, cases=cases))
  return text


def write_results(out: str, name: str, text: str, data: dict) -> None:
  """Writes `text` to NAME.md and `data` to NAME.json under `out`."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, name + '.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(out, name + '.json'), 'w') as f:
    json.dump(data, f, indent=2)


# What must match for a run to be continued in another process.
SAME_MACHINE = ('cpu', 'threads', 'jax', 'torch', 'transformers',
                'xla_flags', 'glibc_tunables')


def load_run(out: str, name: str, env: dict
             ) -> tuple[dict, dict, dict[tuple, dict]]:
  """The environment, ceilings and cases (by `case_key`) of an earlier run
  saved by `save_run`, to be continued on the same machine and software
  (`finished` says which cases need no new run)."""
  path = os.path.join(out, name + '.json')
  if not os.path.exists(path):
    raise SystemExit(f'--resume: no earlier run at {path}; run without '
                     '--resume to start one.')
  with open(path) as f:
    run = json.load(f)
  differ = [k for k in SAME_MACHINE if run['environment'].get(k) != env[k]]
  if differ:
    raise SystemExit(
        f'--resume: {path} was measured with a different ' +
        ', '.join(f'{k} ({run["environment"].get(k)!r}, now {env[k]!r})'
                  for k in differ) + '; use another --name.')
  env = dict(env, load_average=run['environment']['load_average'])
  return env, run['ceilings'], {case_key(c): c for c in run['cases']}


def finished(case: dict) -> bool:
  """Whether a resumed run keeps `case` as it is. Memory is the machine's
  state, not the case's: cases skipped for lack of it are tried again."""
  return not any(case[f].get('skipped', '').startswith(MEMORY_SKIP)
                 for f in FRAMEWORKS)


def merged_cases(selection: list[tuple], done: dict[tuple, dict],
                 new: dict[tuple, dict]) -> list[dict]:
  """What a (resumed) run saves: every selected case measured now or
  earlier, in selection order, then the earlier cases it did not select,
  so that neither a narrower selection nor a stop before the earlier
  cases' turn loses any."""
  measured = {**done, **new}
  chosen = set(selection)
  return ([measured[key] for key in selection if key in measured] +
          [case for key, case in done.items() if key not in chosen])


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 omit: tuple[str, ...] = ()) -> str:
  """The command that reruns this script with `args`' non-default flags
  (those in `omit` left out), as the results files record it."""
  flags = ' '.join(f'--{k}={v}' for k, v in vars(args).items()
                   if v != parser.get_default(k) and k not in omit)
  return f'python experiments/{os.path.basename(sys.argv[0])} {flags}'.strip()


def parse_list(value: str, valid=None, kind=str) -> list:
  """A comma-separated flag's items as `kind`, each one of `valid`."""
  items = [kind(v) for v in value.split(',') if v]
  if valid is not None:
    bad = [v for v in items if v not in valid]
    if bad:
      raise SystemExit(f'Unknown {bad}; valid: {", ".join(valid)}.')
  return items


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--schemes', default=','.join(SCHEMES))
  parser.add_argument('--sizes', default='base,small')
  parser.add_argument('--batch_sizes', default='1,4')
  parser.add_argument('--dtypes', default=','.join(DTYPES))
  parser.add_argument('--modes', default=','.join(MODES))
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--max_seconds', type=float, default=120.0,
                      help='skip a framework whose call takes longer '
                      '(predicted, then its first call)')
  parser.add_argument('--out', default='experiments/results')
  parser.add_argument('--name', default='cpu',
                      help='output file names: NAME.md and NAME.json')
  parser.add_argument('--resume', action='store_true',
                      help='keep the cases already in NAME.json, run the '
                      'rest')
  parser.add_argument('--malloc', default='retain',
                      choices=('retain', 'default'),
                      help='glibc allocator settings, see the docstring')
  args = parser.parse_args()
  if args.malloc == 'retain':
    restart_retaining_memory()
  schemes = parse_list(args.schemes, SCHEMES)
  sizes = parse_list(args.sizes, tuple(SIZES))
  dtypes = parse_list(args.dtypes, DTYPES)
  modes = parse_list(args.modes, MODES)
  batch_sizes = parse_list(args.batch_sizes, kind=int)

  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  env = environment()
  print(env, flush=True)
  command = command_line(parser, args, omit=('resume',))
  ceilings = matmul_ceilings()
  done = {}
  if args.resume:
    env, earlier_ceilings, done = load_run(args.out, args.name, env)
    ceilings = merge_ceilings(earlier_ceilings, ceilings)
  selection = [(scheme, size, dtype, b, mode) for size, scheme, dtype, mode, b
               in itertools.product(sizes, schemes, dtypes, modes,
                                    batch_sizes)]  # `case_key` order.
  new = {}
  for key in selection:
    if key in done and finished(done[key]):
      continue
    scheme, size, dtype, b, mode = key
    new[key] = dict(benchmark_case(
        scheme, size, dtype, b, mode, reps=args.reps, ceilings=ceilings,
        max_seconds=args.max_seconds), command=command)
    print(json.dumps(new[key]), flush=True)
    save_run(args.out, args.name, env, ceilings,
             merged_cases(selection, done, new))
  # Measured again at the end, the best of both: a ceiling measured while
  # the machine was busier would flatter the models.
  ceilings = merge_ceilings(ceilings, matmul_ceilings())
  print(save_run(args.out, args.name, env, ceilings,
                 merged_cases(selection, done, new)))


if __name__ == '__main__':
  main()
