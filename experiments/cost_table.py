r"""Parameters and FLOPs of the schemes beside the paper, and its Fig. 3.

  python experiments/cost_table.py [--out=experiments/results] \
      [--memory_limit_gib=32] [--no_memory]

Writes `cost_table.md`, `cost_table.json` and `cost_curves.png` to --out:

- Parameters of the five schemes at the base size against the paper's
  Table 1, and the FLOPs of one clip's forward pass at base (8 x 224), HR
  (16 x 448) and L (96 x 224) against the paper's TimeSformer figures.
- Divided against joint space-time attention (the paper's Fig. 3): cost as
  the frames grow (8 to 96 at 224 px) and as the frame size grows (224 to
  896 px at 8 frames), marking where a training step of one clip would need
  more than --memory_limit_gib (the paper's joint attention ran out of its
  32 GB GPUs from 448 px or 32 frames on).

Two FLOP counts, both two per multiply-add:

- XLA: the cost analysis of the jitted forward pass on abstract shapes
  (nothing is allocated), as `tsformer_jax.summary` reports it. XLA drops
  what the logits do not need, the last block's MLP and projections of the
  patch tokens, so this count is 3-4% below the network's.
- analytic: every matrix product of the network written out (below), which
  is what the paper's figures count.

The paper counts one operation per multiply-add and reports 3 test views
(1 clip x 3 crops): paper "TFLOPs" = 3 x FLOPs per clip / 2 / 1e12.
Memory is XLA's memory analysis (temporary buffers) of the compiled
training step (forward and backward, batch 1, float32) on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

import tsformer_jax
from tsformer_jax import attention
from tsformer_jax import config_lib
from tsformer_jax import summary

SCHEMES = tuple(attention.SCHEMES)
VARIANTS = ('base', 'hr', 'l')
# Table 1 of the paper (approx. to 0.1M), 400-class heads.
PAPER_PARAMS = {'space_only': 85.9e6, 'joint': 85.9e6, 'divided': 121.4e6,
                'sparse_local_global': 121.4e6, 'axial': 156.8e6}
# Inference "TFLOPs" of TimeSformer (divided) / -HR / -L, Table 2, Sec. 4.3.
PAPER_TFLOPS = {'base': 0.59, 'hr': 5.11, 'l': 7.14}
# Fig. 3: divided against joint attention as the clip grows.
CURVE_SCHEMES = ('divided', 'joint')
FRAMES = (8, 16, 32, 48, 64, 96)
RESOLUTIONS = (224, 336, 448, 560, 672, 784, 896)


def paper_tflops(flops_per_clip: float) -> float:
  """The paper's convention: multiply-adds of 3 views, in tera."""
  return 3 * flops_per_clip / 2 / 1e12


def curve_config(scheme: str, frames: int, resolution: int):
  """Base model of `scheme` on clips of `frames` x `resolution`^2 pixels."""
  config = config_lib.get_config(scheme, 'base')
  config.model.num_frames = frames
  config.model.image_size = (resolution, resolution)
  return config


def _abstract_inputs(config):
  params = jax.eval_shape(
      lambda: tsformer_jax.init_params(config, jax.random.key(0)))
  clip = jax.ShapeDtypeStruct(tsformer_jax.dummy_clips(config).shape,
                              np.float32)
  return params, clip


def param_count(config) -> int:
  params, _ = _abstract_inputs(config)
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def xla_flops(config) -> float:
  """XLA's FLOPs for one clip's forward pass, lowered but not compiled."""
  model = tsformer_jax.create_model(config)
  params, clip = _abstract_inputs(config)
  lowered = jax.jit(lambda p, x: model.apply({'params': p}, x)).lower(
      params, clip)
  analysis = lowered.cost_analysis()
  # Older jax versions return one dict per computation in a list.
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


def train_temp_bytes(config) -> int:
  """Temporary memory of a compiled training step on one clip (gradient of
  the summed logits: the backward pass of any loss keeps the same)."""
  model = tsformer_jax.create_model(config)
  params, clip = _abstract_inputs(config)

  def loss(p, x):
    return model.apply({'params': p}, x, train=True,
                       rngs={'dropout': jax.random.key(0)}).sum()

  compiled = jax.jit(jax.grad(loss)).lower(params, clip).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


# Groups and tokens per group of each attention step on a (T, H, W) grid,
# from the paper's definitions (Sec. 3, Fig. 2), padded where the grid does
# not divide.
_GROUP_SHAPES = {
    'space': lambda t, h, w: (t, h * w),
    'joint': lambda t, h, w: (1, t * h * w),
    'time': lambda t, h, w: (h * w, t),
    'width': lambda t, h, w: (t * h, w),
    'height': lambda t, h, w: (t * w, h),
    'local': lambda t, h, w: (4, t * -(-h // 2) * -(-w // 2)),
    'global': lambda t, h, w: (8, -(-t // 2) * -(-h // 2) * -(-w // 2)),
}


def analytic_flops(config) -> float:
  """FLOPs of every matrix product of one clip's forward pass.

  Per block and attention step: q, k, v (3 D^2 multiply-adds per token)
  and, where the step has one, its output linear layer (D^2) over the
  patches and the class tokens taking part; the output projection (D^2)
  over every group's tokens, padding and class-token copies included (it
  precedes stochastic depth's per-group drop, as in the original); q k^T
  and the weighted sum of v (2 L^2 D per group of L tokens). Then
  the MLP (2 x D x mlp_dim per token). Plus the patch embedding and the
  head. Norms, softmax and GELU are left out, as the paper leaves them.
  """
  m = config.model
  scheme = attention.get_scheme(m.attention)
  t, h, w = tsformer_jax.create_model(config).grid
  d, patches = m.hidden_size, t * h * w
  class_tokens = t if scheme.per_frame else 1
  macs = patches * 3 * m.patch_size**2 * d  # Patch embedding.
  for step in scheme.steps:
    tokens = patches + (class_tokens if step.with_cls else 0)
    linear = 3 + (1 if step.output_fc else 0)
    groups, length = _GROUP_SHAPES[step.grouping](t, h, w)
    length += step.with_cls
    macs += m.depth * (tokens * linear * d * d + groups * length * d * d +
                       groups * 2 * length**2 * d)
  macs += m.depth * (patches + class_tokens) * 2 * d * m.mlp_dim
  macs += d * m.num_classes
  return 2.0 * macs


def table_rows() -> list[dict]:
  """One row per scheme: parameters (base) and FLOPs per variant."""
  rows = []
  for scheme in SCHEMES:
    row = dict(scheme=scheme, paper_params=PAPER_PARAMS[scheme])
    for variant in VARIANTS:
      config = config_lib.get_config(scheme, variant)
      cost = summary.summarize(config)
      row[variant] = dict(flops_per_clip=cost['flops_per_clip'],
                          analytic_flops=analytic_flops(config),
                          forward_temp_bytes=cost['temp_bytes'])
      if variant == 'base':
        row['params'] = cost['params']
      print(scheme, variant, row[variant], flush=True)
    rows.append(row)
  return rows


def curve(scheme: str, axis: str, memory_limit: float | None) -> list[dict]:
  """Cost of `scheme` along `axis` ('frames' or 'resolution').

  Memory is compiled for only as long as it stays under the limit: it
  grows with the clip, so every larger clip is over it too.
  """
  points, over = [], False
  for value in FRAMES if axis == 'frames' else RESOLUTIONS:
    config = (curve_config(scheme, value, 224) if axis == 'frames' else
              curve_config(scheme, 8, value))
    point = dict(value=value, flops_per_clip=xla_flops(config),
                 analytic_flops=analytic_flops(config))
    if memory_limit is not None:
      if not over:
        point['train_temp_bytes'] = train_temp_bytes(config)
        over = point['train_temp_bytes'] > memory_limit
      point['over_limit'] = over
    points.append(point)
    print(scheme, axis, point, flush=True)
  return points


def _percent(value: float, reference: float) -> str:
  return f'{100 * (value / reference - 1):+.1f}%'


def markdown(rows: list[dict], curves: dict, memory_limit_gib: float | None
             ) -> str:
  lines = [
      '# Parameters and FLOPs against the paper', '',
      '`python experiments/cost_table.py`. FLOPs per clip count two per '
      'multiply-add; "paper conv." is the paper\'s convention, multiply-'
      'adds of 3 views (1 clip x 3 crops) in tera: 3 x FLOPs / 2 / 1e12. '
      'XLA: the cost analysis of the compiled forward pass (which drops the '
      'last block\'s work on patch tokens that the logits do not use); '
      'analytic: every matrix product of the network.', '',
      '## Parameters (base, 400 classes)', '',
      '| scheme | ours | paper (Table 1) | difference |', '|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["scheme"]} | {r["params"]:,} | '
                 f'{r["paper_params"] / 1e6:.1f}M | '
                 f'{_percent(r["params"], r["paper_params"])} |')
  lines += ['', '## Divided space-time against the paper\'s TFLOPs', '',
            '| variant | XLA FLOPs per clip | paper conv. (XLA) | analytic '
            'FLOPs per clip | paper conv. (analytic) | paper | XLA diff. | '
            'analytic diff. |', '|---|---|---|---|---|---|---|---|']
  divided = next(r for r in rows if r['scheme'] == 'divided')
  for variant in VARIANTS:
    v = divided[variant]
    xla, exact = paper_tflops(v['flops_per_clip']), paper_tflops(
        v['analytic_flops'])
    paper = PAPER_TFLOPS[variant]
    lines.append(f'| {variant} | {v["flops_per_clip"]:.4g} | {xla:.3f} | '
                 f'{v["analytic_flops"]:.4g} | {exact:.3f} | {paper} | '
                 f'{_percent(xla, paper)} | {_percent(exact, paper)} |')
  lines += ['', '## Every scheme: FLOPs per clip (XLA / analytic) and '
            'forward temporary memory', '',
            '| scheme | ' + ' | '.join(
                f'{v} XLA | {v} analytic | {v} memory' for v in VARIANTS)
            + ' |', '|---' * (1 + 3 * len(VARIANTS)) + '|']
  for r in rows:
    cells = []
    for variant in VARIANTS:
      v = r[variant]
      cells += [f'{v["flops_per_clip"]:.3g}', f'{v["analytic_flops"]:.3g}',
                f'{(v["forward_temp_bytes"] or 0) / 2**30:.2f} GiB']
    lines.append(f'| {r["scheme"]} | ' + ' | '.join(cells) + ' |')
  limit = (f'over {memory_limit_gib:g} GiB' if memory_limit_gib is not None
           else 'not analysed')
  lines += ['', '## Divided against joint as the clip grows (Fig. 3)', '',
            'Paper-convention TFLOPs (XLA count); training-step memory, one '
            f'clip, float32 (* = {limit}; larger clips are not compiled '
            'once one is over).', '']
  for axis, label in (('frames', 'frames (224 px)'),
                      ('resolution', 'frame size (8 frames)')):
    lines += [f'| {label} | ' + ' | '.join(
        f'{s} TFLOPs | {s} memory' for s in CURVE_SCHEMES) + ' |',
              '|---' * (1 + 2 * len(CURVE_SCHEMES)) + '|']
    for i, value in enumerate(FRAMES if axis == 'frames' else RESOLUTIONS):
      cells = []
      for scheme in CURVE_SCHEMES:
        p = curves[scheme][axis][i]
        memory = ('-' if 'train_temp_bytes' not in p else
                  f'{p["train_temp_bytes"] / 2**30:.1f} GiB')
        mark = ' *' if p.get('over_limit') else ''
        cells += [f'{paper_tflops(p["flops_per_clip"]):.2f}{mark}', memory]
      lines.append(f'| {value} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  return '\n'.join(lines)


def plot(curves: dict, memory_limit_gib: float | None, path: str) -> None:
  """Fig. 3: TFLOPs against frame size and frames, divided and joint."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  styles = {'divided': dict(color='tab:blue', marker='o'),
            'joint': dict(color='tab:orange', marker='s')}
  for ax, axis, xlabel in ((axes[0], 'resolution', 'frame size (px), 8 '
                            'frames'),
                           (axes[1], 'frames', 'frames, 224 px')):
    over_label = f'training step > {memory_limit_gib:g} GiB'
    for scheme in CURVE_SCHEMES:
      points = curves[scheme][axis]
      x = [p['value'] for p in points]
      y = [paper_tflops(p['flops_per_clip']) for p in points]
      ax.plot(x, y, label=f'{scheme} space-time', **styles[scheme])
      over = [(xi, yi) for xi, yi, p in zip(x, y, points, strict=True)
              if p.get('over_limit')]
      if over:
        ax.scatter(*zip(*over, strict=True), s=160, facecolors='none',
                   edgecolors='red', linewidths=1.5, zorder=3,
                   label=over_label)
        over_label = None  # One legend entry for both schemes.
    ax.set_xlabel(xlabel)
    ax.set_ylabel('TFLOPs (multiply-adds, 3 views)')
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle('Inference cost, divided vs joint space-time attention '
               '(XLA count; memory: XLA analysis of a 1-clip training step)',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='experiments/results')
  parser.add_argument('--memory_limit_gib', type=float, default=32.0)
  parser.add_argument('--no_memory', action='store_true',
                      help='skip compiling training steps for memory')
  args = parser.parse_args()
  limit_gib = None if args.no_memory else args.memory_limit_gib
  limit = None if limit_gib is None else limit_gib * 2**30
  rows = table_rows()
  curves = {scheme: {axis: curve(scheme, axis, limit)
                     for axis in ('frames', 'resolution')}
            for scheme in CURVE_SCHEMES}
  os.makedirs(args.out, exist_ok=True)
  text = markdown(rows, curves, limit_gib)
  with open(os.path.join(args.out, 'cost_table.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(args.out, 'cost_table.json'), 'w') as f:
    json.dump(dict(rows=rows, curves=curves, memory_limit_gib=limit_gib), f,
              indent=2)
  plot(curves, limit_gib, os.path.join(args.out, 'cost_curves.png'))
  print(text)


if __name__ == '__main__':
  main()
