"""Divided space-time attention ("T+S", Fig. 1), the paper's default: in each
block, time attention (same patch position across frames), then space
attention (within the frame).

The recipe is configs/default.py's, and so is the arg after the colon
(the variant and dataset, e.g. `:hr,ssv2`).
"""

from tsformer_jax.configs import default


def get_config(arg=None):
  return default.get_config(arg, attention='divided')
