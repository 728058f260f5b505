"""TimeSformer with joint attention.

Variants (the arg after the colon): base (default), hr, l, tiny.
  python -m tsformer_jax.summary --config=configs/joint.py:hr
"""

from tsformer_jax import config_lib


def get_config(arg=None):
  return config_lib.get_config('joint', arg)
