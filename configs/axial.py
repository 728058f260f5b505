"""TimeSformer with axial attention.

The arg after the colon: a variant, base (default), hr, l, tiny or demo,
and/or a dataset, comma-separated (e.g. `hr,ssv2`; see the README).
  python -m tsformer_jax.summary --config=configs/axial.py:hr
"""

from tsformer_jax import config_lib


def get_config(arg=None):
  return config_lib.get_config('axial', arg)
