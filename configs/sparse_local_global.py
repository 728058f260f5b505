"""Sparse local-global attention ("L+G", Fig. 1): a local step over
T x H/2 x W/2 windows, then a global step over patches two apart in t, h
and w.

The recipe is configs/default.py's, and so is the arg after the colon
(the variant and dataset, e.g. `:hr,ssv2`).
"""

from tsformer_jax.configs import default


def get_config(arg=None):
  return default.get_config(arg, attention='sparse_local_global')
