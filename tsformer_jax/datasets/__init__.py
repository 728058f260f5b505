"""Datasets: the generated demo and the paper's video datasets.

`get_source(config, split)` turns `config.dataset` into a random-access
`input_pipeline.Source` of labelled videos.
"""

from __future__ import annotations

from tsformer_jax.datasets import synthetic_motion


def _synthetic_motion(config, split):
  return synthetic_motion.Source(split)


SOURCES = {
    'synthetic_motion': _synthetic_motion,
}


def get_source(config, split: str):
  """The videos of `split` of `config.dataset.name`."""
  name = config.dataset.name
  if name not in SOURCES:
    raise ValueError(f'Unknown dataset {name!r}; valid: {sorted(SOURCES)}.')
  return SOURCES[name](config, split)
