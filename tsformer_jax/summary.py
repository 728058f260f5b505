r"""Parameters, FLOPs and memory of one configured model.

  python -m tsformer_jax.summary --config=configs/divided.py:hr [--json]

FLOPs are XLA's count for the compiled forward pass of one clip (two per
multiply-add); the paper counts one per multiply-add and reports three test
views, so its "TFLOPs" equal `3 * flops_per_clip / 2 / 1e12`.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

import tsformer_jax
from tsformer_jax import cli


def _first(analysis: Any) -> dict:
  # Older jax versions return one dict per computation in a list.
  return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def summarize(config) -> dict[str, Any]:
  """`params`, `flops_per_clip` and `temp_bytes` of the inference forward.

  The blocks run unrolled (no scan), so XLA's cost analysis, which counts
  a loop body once, sees every block.
  """
  model = tsformer_jax.create_model(config)
  params = jax.eval_shape(
      lambda: tsformer_jax.init_params(config, jax.random.key(0)))
  clip = jax.ShapeDtypeStruct(tsformer_jax.dummy_clips(config).shape,
                              np.float32)
  forward = jax.jit(
      lambda p, x: model.apply({'params': p}, x),
      compiler_options=tsformer_jax.inference_compiler_options(config, 1))
  compiled = forward.lower(params, clip).compile()
  memory = compiled.memory_analysis()
  return dict(
      params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
      flops_per_clip=float(_first(compiled.cost_analysis())['flops']),
      temp_bytes=int(memory.temp_size_in_bytes) if memory else None,
  )


def format_table(config, summary: dict[str, Any]) -> str:
  m = config.model
  macs = summary['flops_per_clip'] / 2
  rows = [
      ('model', f'{m.attention}, {m.num_frames}x{m.image_size[0]}x'
                f'{m.image_size[1]}, patch {m.patch_size}, D {m.hidden_size},'
                f' depth {m.depth}, heads {m.num_heads}'),
      ('parameters', f'{summary["params"]:,} ({summary["params"] / 1e6:.2f}M)'),
      ('FLOPs per clip (XLA)', f'{summary["flops_per_clip"]:.4g}'),
      ('multiply-adds per clip', f'{macs / 1e9:.1f} G'),
      ('paper convention (3 views)', f'{3 * macs / 1e12:.3f} TFLOPs'),
      ('temporary memory', f'{(summary["temp_bytes"] or 0) / 2**20:.1f} MiB'),
  ]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


@cli.takes(cli.CONFIG, cli.JSON)
def main(argv):
  if len(argv) > 1 or cli.CONFIG.value is None:
    raise cli.Error('Pass --config=configs/<scheme>.py[:arg] and nothing '
                    'else (--help shows more).')
  config = cli.CONFIG.value
  with cli.expected_as_error():  # A bad config value: one line.
    summary = summarize(config)
  print(json.dumps(summary) if cli.JSON.value
        else format_table(config, summary))


if __name__ == '__main__':
  cli.run(main)
