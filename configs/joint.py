"""Joint space-time attention ("ST", Fig. 1): every patch attends to every
patch of the clip.

The recipe is configs/default.py's, and so is the arg after the colon
(the variant and dataset, e.g. `:hr,ssv2`).
"""

from tsformer_jax.configs import default


def get_config(arg=None):
  return default.get_config(arg, attention='joint')
