r"""Compiled memory of the training step: divided and joint, base / HR / L.

  python experiments/memory.py [--out=experiments/results] \
      [--schemes=divided,joint] [--variants=base,hr,l] [--remat=none,full] \
      [--dtype=float32] [--batch_size=1]

For each configuration XLA compiles one SGD training step (forward,
backward, update; `train_step_cost.train_step_memory`) for `--batch_size`
clips on the default backend and reports its memory analysis: arguments
(parameters, momentum, clips), temporaries (activations kept for the
backward pass and scratch) and the peak, their sum less the buffers the step
overwrites in place. Nothing is allocated, so a configuration far larger
than the device still gets its row. Joint attention is compiled twice: with
XLA's attention, which builds the full (T*N)^2 score matrix, and with the
chunked attention (`attention.chunked_attention`), which never does.

On the CPU backend rematerialisation does not show: XLA's CPU compiler
drops the optimisation barriers that keep recomputation in the backward
pass, so the recomputed activations are scheduled early and held. Run it on
a GPU or TPU for the remat rows; the chunked-attention rows hold on any
backend. Writes `memory_<backend>.{json,md,png}` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import train_step_cost

from tsformer_jax import config_lib

GIB = 2 ** 30
BUDGET_GIB = 16  # The target for divided L with remat (the scaling issue).


def configurations(schemes, variants, remats, dtype):
  """(scheme, variant, remat, attention_impl) rows; joint also chunked."""
  for scheme in schemes:
    for variant in variants:
      for remat in remats:
        impls = ('xla', 'chunked') if scheme == 'joint' else ('xla',)
        for impl in impls:
          yield dict(scheme=scheme, variant=variant, remat=remat,
                     attention_impl=impl, dtype=dtype)


def measure(row: dict, batch_size: int) -> dict:
  config = config_lib.get_config(row['scheme'], row['variant'])
  config.model.remat = row['remat']
  config.model.attention_impl = row['attention_impl']
  config.model.dtype = row['dtype']
  m = config.model
  start = time.perf_counter()
  sizes = train_step_cost.train_step_memory(config, batch_size)
  return dict(row, frames=m.num_frames, size=m.image_size[0],
              tokens=m.num_frames * (m.image_size[0] // m.patch_size) ** 2,
              compile_s=round(time.perf_counter() - start, 1),
              **{f'{k}_gib': v / GIB for k, v in sizes.items()})


def markdown(rows: list[dict], backend: str, device: str,
             batch_size: int) -> str:
  lines = [
      f'# Training-step memory on {device} ({backend})', '',
      f'`python experiments/memory.py`, batch {batch_size} per device, '
      f'{rows[0]["dtype"]} compute, float32 parameters and SGD momentum; '
      "XLA's memory analysis of the compiled step (GiB).", '',
      '| scheme | variant | frames x size | tokens | remat | attention | '
      'arguments | temporaries | peak |',
      '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["scheme"]} | {r["variant"]} | {r["frames"]} x {r["size"]} | '
        f'{r["tokens"]} | {r["remat"]} | {r["attention_impl"]} | '
        f'{r["arguments_gib"]:.2f} | {r["temp_gib"]:.2f} | '
        f'{r["peak_gib"]:.2f} |')
  lines += ['', *comparisons(rows)]
  if backend == 'cpu':
    lines += ['', "On the CPU backend remat does not lower the peak: XLA's "
              'CPU compiler drops the optimisation barriers that keep the '
              'recomputation in the backward pass (see the GPU table).']
  return '\n'.join(lines) + '\n'


def comparisons(rows: list[dict]) -> list[str]:
  """Sentences: remat's and chunked attention's savings, the L budget."""
  by_key = {(r['scheme'], r['variant'], r['remat'], r['attention_impl']): r
            for r in rows}
  notes = []
  for (scheme, variant, remat, impl), r in by_key.items():
    naive = by_key.get((scheme, variant, remat, 'xla'))
    if impl == 'chunked' and naive:
      notes.append(
          f'- {scheme} {variant}, remat {remat}: chunked attention needs '
          f'{r["peak_gib"]:.2f} GiB against {naive["peak_gib"]:.2f} GiB '
          f'({naive["peak_gib"] / r["peak_gib"]:.1f}x less).')
    plain = by_key.get((scheme, variant, 'none', impl))
    if remat != 'none' and plain:
      notes.append(
          f'- {scheme} {variant}, {impl} attention: remat {remat} needs '
          f'{r["peak_gib"]:.2f} GiB against {plain["peak_gib"]:.2f} GiB '
          'without.')
  for r in rows:
    if (r['scheme'], r['variant']) == ('divided', 'l') and r['remat'] != 'none':
      verdict = 'under' if r['peak_gib'] < BUDGET_GIB else 'over'
      notes.append(f'- Divided L (96 x 224) with remat {r["remat"]}: '
                   f'{r["peak_gib"]:.2f} GiB, {verdict} {BUDGET_GIB} GiB.')
  return notes


def plot(rows: list[dict], path: str, title: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = [f'{r["scheme"]} {r["variant"]}\n{r["remat"]}, '
            f'{r["attention_impl"]}' for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4.5))
  ax.bar(range(len(rows)), [r['peak_gib'] for r in rows],
         color=['C0' if r['scheme'] == 'divided' else
                'C2' if r['attention_impl'] == 'chunked' else 'C1'
                for r in rows])
  ax.axhline(BUDGET_GIB, color='k', linestyle='--', linewidth=1,
             label=f'{BUDGET_GIB} GiB')
  ax.set_yscale('log')
  ax.set_ylabel('peak memory of a training step (GiB)')
  ax.set_xticks(range(len(rows)), labels, rotation=60, ha='right',
                fontsize=7)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def render(path: str):
  """The table and plot of a saved run (`memory_<backend>.json`)."""
  with open(path) as f:
    run = json.load(f)
  name = os.path.splitext(path)[0]
  with open(name + '.md', 'w') as f:
    f.write(markdown(run['rows'], run['backend'], run['device'],
                     run['batch_size']))
  plot(run['rows'], name + '.png', f'Training step, batch '
       f'{run["batch_size"]}, {run["device"]} ({run["backend"]})')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='experiments/results')
  parser.add_argument('--schemes', default='divided,joint')
  parser.add_argument('--variants', default='base,hr,l')
  parser.add_argument('--remat', default='none,full')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--batch_size', type=int, default=1)
  parser.add_argument('--render', default='',
                      help='Only rewrite the .md and .png of this .json.')
  args = parser.parse_args()
  if args.render:
    render(args.render)
    return
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  os.makedirs(args.out, exist_ok=True)
  name = os.path.join(args.out, f'memory_{backend}')
  rows = []
  for row in configurations(args.schemes.split(','),
                            args.variants.split(','),
                            args.remat.split(','), args.dtype):
    rows.append(measure(row, args.batch_size))
    r = rows[-1]
    print(f'{r["scheme"]:8} {r["variant"]:4} remat={r["remat"]:5} '
          f'{r["attention_impl"]:7} peak {r["peak_gib"]:8.2f} GiB '
          f'(temp {r["temp_gib"]:.2f}, compile {r["compile_s"]} s)',
          flush=True)
    # After every row: a run cut short keeps what it measured.
    with open(name + '.json', 'w') as f:
      json.dump(dict(backend=backend, device=device, jax=jax.__version__,
                     batch_size=args.batch_size, rows=rows), f, indent=1)
    text = markdown(rows, backend, device, args.batch_size)
    with open(name + '.md', 'w') as f:
      f.write(text)
  plot(rows, name + '.png',
       f'Training step, batch {args.batch_size}, {device} ({backend})')
  print(text)


if __name__ == '__main__':
  main()
