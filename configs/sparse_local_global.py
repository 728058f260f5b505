"""TimeSformer with sparse local global attention.

Variants (the arg after the colon): base (default), hr, l, tiny.
  python -m tsformer_jax.summary --config=configs/sparse_local_global.py:hr
"""

from tsformer_jax import config_lib


def get_config(arg=None):
  return config_lib.get_config('sparse_local_global', arg)
