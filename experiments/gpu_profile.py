r"""Where a training step's time goes: a profiler trace summed by kind of op.

  python experiments/gpu_profile.py [--out=experiments/results] \
      [--variant=base] [--batch_size=32] [--attention_impl=xla] \
      [--remat=none] [--steps=3]
  python experiments/gpu_profile.py --smoke   # tiny model, any backend
  python experiments/gpu_profile.py --trace=T.json.gz --hlo=STEP.hlo.txt

Compiles the plain SGD training step of divided attention
(`train_step_cost.train_step`, bfloat16 compute), runs it twice, then traces
`--steps` more under `jax.profiler.trace(create_perfetto_trace=True)` and
reads the Chrome-format trace the profiler writes beside its `.xplane.pb`
(`perfetto_trace.json.gz`). Each kernel (GPU) or thunk (CPU) event names
the HLO instruction it runs (`hlo_op`, or the kernel's name); the compiled
module's HLO text says what that instruction is: its opcodes (for a fusion,
those of the fused computation), custom-call target and the jax name stack
it came from (`op_name`, e.g. `jit(step)/transpose(jvp(TimeSformer))/
block_3/time_attention/...`). Each event then gets one kind, the first rule
that matches (`classify`):

1. optimizer: its name stack lies outside the gradient (no `jvp(`): the SGD
   update.
2. attention: a fused-attention kernel (cuDNN's fmha, flash, ours:
   `tsformer_temporal_attention_*`).
3. matmul: a dot or convolution in the instruction or its fusion, a
   cuBLAS / cuDNN / Triton GEMM call, or a kernel named as a GEMM (`gemm`,
   `xmma`, `nvjet`, `cutlass`).
4. layout: only data movement (transpose, copy, concatenate, slice, pad,
   broadcast, reshape, dynamic-(update-)slice; converts and bitcasts
   along), or a memcpy / memset.
5. attention: the rest of an attention step's core (the softmax, its
   derivative and the scaling), i.e. a name stack inside `*_attention/`
   but not in its norm, qkv, proj or fc layers.
6. norms and elementwise: everything else the HLO knows (layer norms,
   GELU, residual sums, drop path, the loss).
7. other: events the HLO does not name.

A second table splits the time by part of the model (from the name stack),
forward and backward. On GPUs the benchmark traces with XLA's command
buffers off (`--xla_gpu_enable_command_buffer=`), so that kernels replayed
from CUDA graphs still carry their HLO names. Writes
`gpu_profile_<device>.{md,json}` to --out.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Iterable
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

KINDS = ('matmul', 'attention', 'layout', 'norms and elementwise',
         'optimizer', 'other')
MATMUL_OPS = frozenset({'dot', 'convolution', 'ragged-dot', 'scaled-dot'})
LAYOUT_OPS = frozenset({
    'transpose', 'copy', 'concatenate', 'slice', 'dynamic-slice',
    'dynamic-update-slice', 'pad', 'reshape', 'broadcast', 'reverse',
    'copy-start', 'copy-done', 'iota'})
# Carried along by data movement without making it compute.
PASSIVE_OPS = frozenset({'parameter', 'constant', 'tuple',
                         'get-tuple-element', 'bitcast', 'convert',
                         'fusion'})
ATTENTION_KERNEL = re.compile(r'fmha|flash|tsformer_temporal_attention',
                              re.I)
GEMM_NAME = re.compile(r'gemm|xmma|nvjet|cutlass|cublas|matmul', re.I)
LAYOUT_NAME = re.compile(r'memcpy|memset', re.I)
ATTENTION_SCOPE = re.compile(r'(\w+)_attention/(?!(norm|qkv|proj|fc)/)')
# Derived lines of a GPU trace that repeat the kernels' time.
DERIVED_LINES = ('XLA Modules', 'XLA Ops', 'Framework Ops',
                 'Framework Name Scope', 'Source code', 'Steps',
                 'Launch Stats', 'XLA TraceMe')


# ---------------------------------------------------------------- HLO text


def _sanitized(name: str) -> str:
  """An HLO name as a kernel is named after it ('.' and '-' become '_')."""
  return re.sub(r'[^\w]', '_', name)


def hlo_index(text: str) -> dict[str, dict]:
  """Instruction name (and its kernel-style name) -> what it is.

  Each entry: `opcode`, `ops` (its opcodes, with those of every computation
  it calls), `op_name` (the jax name stack), `target` (custom-call target
  and backend kind, '' if none).
  """
  computations: dict[str, list[dict]] = {}
  current = None
  for line in text.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      current = computations.setdefault(header.group(1), [])
      continue
    m = re.match(r'^\s+(?:ROOT )?%?([\w.\-]+) = .*?[\]})] ([a-z][\w\-]*)\(',
                 line)
    if not m or current is None:
      continue
    calls = re.findall(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)',
                       line)
    calls += [c for group in re.findall(r'called_computations=\{([^}]*)\}',
                                        line)
              for c in re.findall(r'%?([\w.\-]+)', group)]
    op_name = re.search(r'op_name="([^"]*)"', line)
    # A custom call's target, and a fusion's backend kind (__triton_gemm,
    # __cudnn$fmha...).
    target = ' '.join(re.findall(r'custom_call_target="([^"]*)"', line) +
                      re.findall(r'"kind":"([^"]*)"', line))
    current.append(dict(name=m.group(1), opcode=m.group(2), calls=calls,
                        op_name=op_name.group(1) if op_name else '',
                        target=target))

  @functools.cache
  def ops_of(computation: str) -> frozenset:
    ops = set()
    for inst in computations.get(computation, ()):
      ops.add(inst['opcode'])
      for c in inst['calls']:
        ops |= ops_of(c)
    return frozenset(ops)

  @functools.cache
  def name_of(computation: str) -> str:
    """The commonest name stack inside a computation, for the fusions
    XLA leaves without one."""
    names = collections.Counter(
        inst['op_name'] or name_of(c) if inst['calls'] else inst['op_name']
        for inst in computations.get(computation, ())
        for c in (inst['calls'] or [None]))
    names.pop('', None)
    return names.most_common(1)[0][0] if names else ''

  index = {}
  for insts in computations.values():
    for inst in insts:
      ops = {inst['opcode']}
      for c in inst['calls']:
        ops |= ops_of(c)
      op_name = inst['op_name'] or next(
          filter(None, map(name_of, inst['calls'])), '')
      entry = dict(opcode=inst['opcode'], ops=frozenset(ops),
                   op_name=op_name, target=inst['target'])
      index.setdefault(inst['name'], entry)
      index.setdefault(_sanitized(inst['name']), entry)
  return index


# ----------------------------------------------------------- classification


def classify(event_name: str, op: dict | None) -> str:
  """The kind of one kernel or thunk (rules in the module docstring)."""
  op_name = op['op_name'] if op else ''
  target = op['target'] if op else ''
  if op_name.startswith('jit(') and 'jvp(' not in op_name:
    return 'optimizer'
  if ATTENTION_KERNEL.search(event_name) or ATTENTION_KERNEL.search(target):
    return 'attention'
  if op is not None:
    if op['ops'] & MATMUL_OPS or re.search(r'gemm|cublas|conv|matmul',
                                           target, re.I):
      return 'matmul'
    active = op['ops'] - PASSIVE_OPS
    if (active and active <= LAYOUT_OPS) or op['opcode'] in LAYOUT_OPS:
      return 'layout'
    if ATTENTION_SCOPE.search(op_name):
      return 'attention'
    return 'norms and elementwise'
  if GEMM_NAME.search(event_name):
    return 'matmul'
  if LAYOUT_NAME.search(event_name):
    return 'layout'
  return 'other'


def part(op: dict | None) -> tuple[str, str]:
  """(part of the model, 'forward' / 'backward' / '-') from the name stack."""
  op_name = op['op_name'] if op else ''
  if not op_name:
    return 'unknown', '-'
  if 'jvp(' not in op_name:
    return 'optimizer', '-'
  direction = 'backward' if 'transpose(jvp(' in op_name else 'forward'
  rules = [(r'_attention/(qkv|proj|fc)/', 'attention linear layers'),
           (r'(^|/)(norm|mlp_norm)/|_attention/norm/', 'layer norms'),
           (r'(\w+)_attention/', None),
           (r'/mlp/', 'MLP'), (r'DropPath', 'drop path'),
           (r'/embedding/', 'patch embedding'), (r'/head/', 'head')]
  for pattern, name in rules:
    m = re.search(pattern, op_name)
    if m:
      return name or f'{m.group(1)} attention (core)', direction
  return 'other (embeddings, loss)', direction


# ------------------------------------------------------------------ trace


def find_trace(logdir: str) -> str:
  """The Chrome-format trace `jax.profiler.trace` wrote under `logdir`."""
  for pattern in ('perfetto_trace.json.gz', '*.trace.json.gz'):
    found = sorted(glob.glob(os.path.join(logdir, '**', pattern),
                             recursive=True))
    if found:
      return found[-1]
  raise FileNotFoundError(f'No trace.json.gz under {logdir}: the profiler '
                          'wrote only ' + ', '.join(
                              glob.glob(os.path.join(logdir, '**', '*'),
                                        recursive=True)))


def load_trace(path: str) -> tuple[list[dict], dict, dict]:
  """Complete events, process names and thread names of a Chrome trace."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt') as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[e['pid'], e.get('tid')] = e['args']['name']
  complete = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  return complete, processes, threads


def _leaves(events: list[dict]) -> list[dict]:
  """Drops events that enclose another on their thread (a while loop's or
  a call's thunk around its body's), so time is not counted twice."""
  keep = []
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[e['pid'], e.get('tid')].append(e)
  for line in by_thread.values():
    line.sort(key=lambda e: (e['ts'], -e['dur']))
    for i, e in enumerate(line):
      nxt = line[i + 1] if i + 1 < len(line) else None
      if nxt is not None and nxt['ts'] + nxt['dur'] <= e['ts'] + e['dur']:
        continue
      keep.append(e)
  return keep


def kernel_events(events: list[dict], processes: dict, threads: dict,
                  module: str | None = None) -> list[dict]:
  """The step's kernels: a device's raw streams where the trace has a
  device, else the host's XLA thunks (CPU), of `module` if given."""
  devices = {pid for pid, name in processes.items()
             if name.startswith('/device:')}
  on_device = [e for e in events if e['pid'] in devices and
               threads.get((e['pid'], e.get('tid')), '') not in DERIVED_LINES]
  streams = [e for e in on_device if threads.get(
      (e['pid'], e.get('tid')), '').startswith('Stream')]
  chosen = streams or on_device
  if not chosen:
    chosen = [e for e in events if 'hlo_op' in e.get('args', {})]
  if module:
    chosen = [e for e in chosen
              if e.get('args', {}).get('hlo_module', module).startswith(
                  module)]
  return _leaves(chosen)


def _op_for(event: dict, index: dict[str, dict]) -> dict | None:
  args = event.get('args', {})
  for name in (args.get('hlo_op'), event['name'],
               _sanitized(event['name'])):
    if name and name in index:
      return index[name]
  return None


def summarize(events: Iterable[dict], index: dict[str, dict], steps: int,
              step_wall_s: float | None = None, top: int = 15) -> dict:
  """Time per step by kind, by part of the model and by kernel."""
  kinds = collections.Counter()
  counts = collections.Counter()
  parts = collections.defaultdict(collections.Counter)
  kernels = collections.defaultdict(lambda: dict(us=0.0, calls=0))
  for e in events:
    op = _op_for(e, index)
    kind = classify(e['name'], op)
    where, direction = part(op)
    kinds[kind] += e['dur']
    counts[kind] += 1
    parts[where][direction] += e['dur']
    k = kernels[e['name']]
    k.update(kind=kind, part=where, us=k['us'] + e['dur'],
             calls=k['calls'] + 1)
  total = sum(kinds.values()) or 1.0
  ms = lambda us: us / 1e3 / steps
  return dict(
      steps=steps,
      kernel_ms_per_step=ms(total),
      wall_ms_per_step=None if step_wall_s is None else 1e3 * step_wall_s,
      kinds=[dict(kind=k, ms=ms(kinds[k]), share=kinds[k] / total,
                  kernels=counts[k] / steps) for k in KINDS],
      parts=sorted(
          (dict(part=p, forward_ms=ms(d['forward']),
                backward_ms=ms(d['backward']), other_ms=ms(d['-']),
                share=sum(d.values()) / total) for p, d in parts.items()),
          key=lambda r: -r['share']),
      top=[dict(kernel=name, kind=k['kind'], part=k['part'], ms=ms(k['us']),
                share=k['us'] / total, calls=k['calls'] / steps)
           for name, k in sorted(kernels.items(),
                                 key=lambda kv: -kv[1]['us'])[:top]])


def markdown(summary: dict, title: str, command: str) -> str:
  s = summary
  wall = s['wall_ms_per_step']
  lines = [f'# {title}', '', f'`{command}`', '',
           f'{s["steps"]} traced steps. Kernel time per step (summed over '
           f'kernels): {s["kernel_ms_per_step"]:.2f} ms' +
           (f'; wall time per step {wall:.2f} ms.' if wall else '.'),
           'Kinds and rules: `experiments/gpu_profile.py`.', '',
           '| kind | ms per step | share | kernels per step |',
           '|---|---|---|---|']
  for r in s['kinds']:
    lines.append(f'| {r["kind"]} | {r["ms"]:.2f} | {100 * r["share"]:.1f}% '
                 f'| {r["kernels"]:.0f} |')
  lines += ['', '## By part of the model', '',
            '| part | forward ms | backward ms | other ms | share |',
            '|---|---|---|---|---|']
  for r in s['parts']:
    lines.append(f'| {r["part"]} | {r["forward_ms"]:.2f} | '
                 f'{r["backward_ms"]:.2f} | {r["other_ms"]:.2f} | '
                 f'{100 * r["share"]:.1f}% |')
  lines += ['', f'## The {len(s["top"])} longest kernels', '',
            '| kernel | kind | part | ms per step | share | calls per step |',
            '|---|---|---|---|---|---|']
  for r in s['top']:
    name = r['kernel'] if len(r['kernel']) <= 60 else r['kernel'][:57] + '...'
    lines.append(f'| `{name}` | {r["kind"]} | {r["part"]} | {r["ms"]:.3f} | '
                 f'{100 * r["share"]:.1f}% | {r["calls"]:.0f} |')
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------- capture


def capture(config, batch_size: int, steps: int, logdir: str) -> dict:
  """Traces `steps` SGD steps (after two untraced ones).

  Returns the trace path, the compiled HLO text, its module name, the
  median wall time of a traced step, the first step's loss and the device.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import train_step_cost  # pylint: disable=g-import-not-at-top

  import tsformer_jax  # pylint: disable=g-import-not-at-top

  compiled = train_step_cost.lower_train_step(config, batch_size).compile()
  hlo = compiled.as_text()
  module = re.match(r'HloModule ([\w.\-]+)', hlo).group(1)
  params = tsformer_jax.init_params(config, jax.random.key(0))
  opt_state = train_step_cost.train_step(config)[1].init(params)
  clips = jax.random.normal(
      jax.random.key(1), tsformer_jax.dummy_clips(config, batch_size).shape)
  labels = jnp.arange(batch_size, dtype=jnp.int32) % config.model.num_classes
  rng = jax.random.key(2)
  state = (params, opt_state)
  losses = []
  for _ in range(2):
    *state, loss = compiled(*state, clips, labels, rng)
    losses.append(float(loss))
  walls = []
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=i):
        start = time.perf_counter()
        *state, loss = compiled(*state, clips, labels, rng)
        jax.block_until_ready(loss)
        walls.append(time.perf_counter() - start)
  # Kept beside the trace, for `--trace=... --hlo=...` later.
  with open(os.path.join(logdir, 'step.hlo.txt'), 'w') as f:
    f.write(hlo)
  return dict(trace=find_trace(logdir), hlo=hlo, module=module,
              step_wall_s=sorted(walls)[len(walls) // 2],
              first_loss=losses[0], device=jax.devices()[0].device_kind,
              backend=jax.default_backend())


def profile(config, batch_size: int, steps: int, out: str | None,
            command: str, logdir: str | None = None) -> dict:
  """Captures, summarises and (with `out`) writes the md and json."""
  logdir = logdir or tempfile.mkdtemp(prefix='gpu_profile_')
  got = capture(config, batch_size, steps, logdir)
  events, processes, threads = load_trace(got['trace'])
  chosen = kernel_events(events, processes, threads, got['module'])
  result = summarize(chosen, hlo_index(got['hlo']), steps,
                     got['step_wall_s'])
  m = config.model
  result.update(device=got['device'], backend=got['backend'],
                batch_size=batch_size, attention_impl=m.attention_impl,
                remat=m.remat, variant=f'{m.num_frames} x {m.image_size[0]}',
                first_loss=got['first_loss'], trace=got['trace'],
                hlo_path=os.path.join(logdir, 'step.hlo.txt'),
                command=command)
  if out:
    write(result, out)
  return result


def write(result: dict, out: str, suffix: str = '',
          json_too: bool = True) -> str:
  """Writes `gpu_profile_<device><suffix>.md` (and `.json`); returns the
  path without the extension."""
  os.makedirs(out, exist_ok=True)
  name = 'gpu_profile_' + ''.join(c if c.isalnum() else '_'
                                  for c in result['device']) + suffix
  title = (f'Training-step profile on {result["device"]}: divided '
           f'{result["variant"]}, batch {result["batch_size"]}, attention '
           f'{result["attention_impl"]}, remat {result["remat"]}, bfloat16')
  if json_too:
    with open(os.path.join(out, name + '.json'), 'w') as f:
      json.dump(result, f, indent=2)
  with open(os.path.join(out, name + '.md'), 'w') as f:
    f.write(markdown(result, title, result['command']))
  return os.path.join(out, name)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=None,
                      help='default experiments/results (--smoke: a '
                      'temporary directory)')
  parser.add_argument('--variant', default='base')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--attention_impl', default='xla')
  parser.add_argument('--remat', default='none')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--smoke', action='store_true',
                      help='tiny model, batch 2: any backend, seconds')
  parser.add_argument('--trace', help='summarise this trace.json.gz instead')
  parser.add_argument('--hlo', help='with --trace: the step\'s HLO text')
  args = parser.parse_args()
  if args.trace:
    with open(args.hlo) as f:
      hlo = f.read()
    events, processes, threads = load_trace(args.trace)
    module = re.match(r'HloModule ([\w.\-]+)', hlo).group(1)
    result = summarize(kernel_events(events, processes, threads, module),
                       hlo_index(hlo), args.steps)
    print(markdown(result, f'Profile of {args.trace}', ' '.join(
        ['python', 'experiments/gpu_profile.py', f'--trace={args.trace}'])))
    return
  from tsformer_jax import config_lib  # pylint: disable=g-import-not-at-top
  if args.smoke:
    args.variant, args.batch_size = 'tiny', 2
  out = args.out or (tempfile.mkdtemp(prefix='gpu_profile_')
                     if args.smoke else 'experiments/results')
  config = config_lib.get_config('divided', args.variant)
  config.model.dtype = 'bfloat16'
  config.model.attention_impl = args.attention_impl
  config.model.remat = args.remat
  command = ('python experiments/gpu_profile.py ' + ' '.join(
      f'--{k}={v}' for k, v in (
          ('variant', args.variant), ('batch_size', args.batch_size),
          ('attention_impl', args.attention_impl), ('remat', args.remat),
          ('steps', args.steps))))
  result = profile(config, args.batch_size, args.steps, out, command)
  print(markdown(result, 'Training-step profile', command))
  print(f'Wrote {write(result, out)}.md and .json')


if __name__ == '__main__':
  main()
