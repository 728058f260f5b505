r"""Attention's batched matrix products on CPU: XLA against PyTorch, by cores.

  python experiments/attention_products.py [--groups=96] [--length=197] \
      [--head_dim=64] [--cores=1,2] [--reps=15] [--out=experiments/results]

Attention multiplies one small matrix pair per group and head: the base
model's space attention, per clip, 96 pairs (8 frames x 12 heads) with
197 tokens of 64 features. Its forward pass has two forms of product,
q k^T and p v; its backward pass has p v's form once more (the query
gradient ds k) and a third one twice (the key and value gradients ds^T q
and p^T do, which `attention.cpu_attention` writes feature-major).

This script times each form as a jitted `jnp.einsum` and as
`torch.einsum`, the two taking turns (`benchmark_cpu.interleaved_times`),
once in a process bound to each of --cores cores, so that the table shows
what more cores add to each framework. Runs under the benchmark's
allocator settings. Writes `attention_products.md` and `.json` to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys

import benchmark_cpu
import jax
import jax.numpy as jnp
import numpy as np

# name -> (einsum, which operands are [G, L, L] rather than [G, L, Dh]).
FORMS = {
    'q k^T': ('gqd,gkd->gqk', (False, False)),
    'p v': ('gqk,gkd->gqd', (True, False)),
    'ds^T q': ('gqk,gqd->gkd', (True, False)),
    'q^T ds (feature-major)': ('gqd,gqk->gdk', (False, True)),
}


def _waited(fn, *args):
  return jax.block_until_ready(fn(*args))


def _kernel(compiled_text: str) -> str:
  return 'YNNPACK' if 'ynn_fusion' in compiled_text else 'Eigen'


def time_forms(groups: int, length: int, head_dim: int, reps: int
               ) -> list[dict]:
  """GFLOP/s of each of `FORMS` in both frameworks, in this process."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  flops = 2 * groups * length * length * head_dim
  rows = []
  for name, (equation, square) in FORMS.items():
    a, b = (rng.normal(size=(groups, length, length if sq else head_dim))
            .astype(np.float32) for sq in square)
    product = jax.jit(lambda x, y, eq=equation: jnp.einsum(eq, x, y))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    compiled = product.lower(ja, jb).compile()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    times = benchmark_cpu.interleaved_times({
        'jax': functools.partial(_waited, compiled, ja, jb),
        'torch': functools.partial(torch.einsum, equation, ta, tb)}, reps)
    medians = {k: statistics.median(v) for k, v in times.items()}
    rows.append(dict(
        form=name, einsum=equation, groups=groups, length=length,
        head_dim=head_dim, cores=len(os.sched_getaffinity(0)),
        torch_threads=torch.get_num_threads(),
        xla_kernel=_kernel(compiled.as_text()),
        jax_gflops=flops / medians['jax'] / 1e9,
        torch_gflops=flops / medians['torch'] / 1e9,
        speedup=medians['torch'] / medians['jax']))
  return rows


def markdown(rows: list[dict], command: str) -> str:
  r = rows[0]
  cpu = benchmark_cpu.environment()['cpu']
  lines = [
      "# Attention's batched products: XLA against PyTorch, by cores", '',
      f'`{command}`', '',
      f'{r["groups"]} products of {r["length"]} x {r["length"]} x '
      f'{r["head_dim"]} per call, float32, on {cpu}; GFLOP/s of the '
      'median call; speedup = PyTorch time / ours.', '',
      '| product | einsum | cores | XLA kernel | ours GFLOP/s | '
      'PyTorch GFLOP/s | speedup |', '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["form"]} | `{r["einsum"]}` | {r["cores"]} | '
        f'{r["xla_kernel"]} | {r["jax_gflops"]:.1f} | '
        f'{r["torch_gflops"]:.1f} | {r["speedup"]:.2f}x |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--groups', type=int, default=96)
  parser.add_argument('--length', type=int, default=197)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--cores', default='1,2')
  parser.add_argument('--reps', type=int, default=15)
  parser.add_argument('--out', default='experiments/results')
  parser.add_argument('--child_cores', type=int, default=0,
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  benchmark_cpu.restart_retaining_memory()  # As the benchmark: see there.
  sizes = dict(groups=args.groups, length=args.length,
               head_dim=args.head_dim, reps=args.reps)
  if args.child_cores:
    # Before either framework starts its thread pool, which takes its size
    # from the cores this process may run on.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.child_cores])
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.child_cores)
    print(json.dumps(time_forms(**sizes)))
    return
  available = len(os.sched_getaffinity(0))
  cores = benchmark_cpu.parse_list(args.cores, kind=int)
  if not all(0 < n <= available for n in cores):
    raise SystemExit(f'--cores={args.cores}: this process may use 1 to '
                     f'{available} cores.')
  rows = []
  for n in cores:
    child = subprocess.run(
        [sys.executable, __file__, f'--child_cores={n}'] +
        [f'--{k}={v}' for k, v in sizes.items()],
        capture_output=True, text=True, check=False)
    if child.returncode:
      raise SystemExit(f'The run on {n} cores failed:\n{child.stderr}')
    rows += json.loads(child.stdout.strip().splitlines()[-1])
  rows.sort(key=lambda r: (list(FORMS).index(r['form']), r['cores']))
  command = benchmark_cpu.command_line(parser, args)
  text = markdown(rows, command)
  benchmark_cpu.write_results(args.out, 'attention_products', text,
                              dict(command=command, rows=rows))
  print(text)


if __name__ == '__main__':
  main()
