"""TimeSformer with divided attention.

Variants (the arg after the colon): base (default), hr, l, tiny.
  python -m tsformer_jax.summary --config=configs/divided.py:hr
"""

from tsformer_jax import config_lib


def get_config(arg=None):
  return config_lib.get_config('divided', arg)
