r"""Our model on CPU with XLA's default product kernels and with Eigen's.

  python experiments/xla_cpu_options.py [--schemes=divided,joint] \
      [--size=base] [--depth=12] [--batch_sizes=1,4] [--modes=forward,train] \
      [--reps=5] [--out=experiments/results]

By default XLA's CPU backend hands matrix products to YNNPACK, and from
3 base clips per call up fuses layer norms and the products around them
into YNNPACK graphs; the option `xla_cpu_experimental_ynn_fusion_type=''`
sends every product to Eigen instead (`tsformer_jax.
inference_compiler_options` sets it for inference). For each case the same
model is compiled both ways in one process and the two take turns rep by
rep (`benchmark_cpu.interleaved_times`), so that a shared machine's noise
falls on both alike. Each row gives both medians and their ratio (above 1:
Eigen is faster). `--depth` below 12 trims the model to fit memory and
time. Runs under the benchmark's allocator settings
(`benchmark_cpu.MALLOC_TUNABLES`). Writes `xla_cpu_options.md` and `.json`
to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import benchmark_cpu
import jax

VARIANTS = {'XLA defaults': {},
            'Eigen': {'xla_cpu_experimental_ynn_fusion_type': ''}}


def compare(config, batch_size: int, mode: str, reps: int) -> dict:
  """Median seconds per call of both variants and defaults / Eigen."""
  runners = {
      name: benchmark_cpu.jax_runner(config, batch_size, mode, options)[0]
      for name, options in VARIANTS.items()}
  times = benchmark_cpu.interleaved_times(runners, reps)
  medians = {name: statistics.median(t) for name, t in times.items()}
  return dict(times_s=times, median_s=medians,
              speedup=medians['XLA defaults'] / medians['Eigen'])


def markdown(rows: list[dict], command: str) -> str:
  lines = [
      "# XLA's CPU product kernels: defaults against Eigen", '',
      f'`{command}`', '',
      f'Eigen: `{VARIANTS["Eigen"]}`. CPU: {rows[0]["cpu"]}; '
      f'jax {jax.__version__}.', '',
      '| scheme | size | depth | dtype | mode | batch | defaults (s) | '
      'Eigen (s) | speedup |',
      '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    default, eigen = (r['median_s'][v] for v in VARIANTS)
    lines.append(f'| {r["scheme"]} | {r["size"]} | {r["depth"]} | '
                 f'{r["dtype"]} | {r["mode"]} | {r["batch_size"]} | '
                 f'{default:.3f} | {eigen:.3f} | {r["speedup"]:.2f}x |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--schemes', default='divided,joint')
  parser.add_argument('--size', default='base',
                      choices=tuple(benchmark_cpu.SIZES))
  parser.add_argument('--dtype', default='float32',
                      choices=benchmark_cpu.DTYPES)
  parser.add_argument('--depth', type=int, default=12)
  parser.add_argument('--batch_sizes', default='1,4')
  parser.add_argument('--modes', default=','.join(benchmark_cpu.MODES))
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--out', default='experiments/results')
  args = parser.parse_args()
  benchmark_cpu.restart_retaining_memory()  # As the benchmark: see there.
  schemes = benchmark_cpu.parse_list(args.schemes, benchmark_cpu.SCHEMES)
  modes = benchmark_cpu.parse_list(args.modes, benchmark_cpu.MODES)
  batch_sizes = benchmark_cpu.parse_list(args.batch_sizes, kind=int)
  command = benchmark_cpu.command_line(parser, args)
  cpu = benchmark_cpu.environment()['cpu']
  rows = []
  for scheme, mode, batch_size in itertools.product(schemes, modes,
                                                    batch_sizes):
    config = benchmark_cpu.model_config(scheme, args.size, args.dtype)
    config.model.depth = args.depth
    row = dict(scheme=scheme, size=args.size, depth=args.depth,
               dtype=args.dtype, mode=mode, batch_size=batch_size, cpu=cpu)
    row.update(compare(config, batch_size, mode, args.reps))
    rows.append(row)
    print(json.dumps(row), flush=True)
    benchmark_cpu.release_free_heap()
  text = markdown(rows, command)
  benchmark_cpu.write_results(args.out, 'xla_cpu_options', text,
                              dict(command=command, rows=rows))
  print(text)


if __name__ == '__main__':
  main()
