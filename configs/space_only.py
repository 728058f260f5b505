"""Space-only attention ("S", Fig. 1): each frame attends within itself;
the per-frame image model, class tokens averaged over frames.

The recipe is configs/default.py's, and so is the arg after the colon
(the variant and dataset, e.g. `:hr,ssv2`).
"""

from tsformer_jax.configs import default


def get_config(arg=None):
  return default.get_config(arg, attention='space_only')
