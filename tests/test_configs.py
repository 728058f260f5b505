"""The config files: variants, errors, and loading through config_flags."""

import pathlib

from ml_collections import config_flags
import pytest

from tsformer_jax import attention
from tsformer_jax import config_lib
from tsformer_jax import model

CONFIGS = pathlib.Path(__file__).parent.parent / 'configs'


@pytest.mark.parametrize('scheme', sorted(attention.SCHEMES))
def test_each_scheme_has_a_config_file(scheme):
  config = config_flags.config_flags._ConfigFileParser(  # pylint: disable=protected-access
      name='config').parse(f'{CONFIGS / scheme}.py:hr')
  assert config.model.attention == scheme
  assert config.model.num_frames == 16
  assert tuple(config.model.image_size) == (448, 448)
  assert config.data.sampling_rate == 16


def test_variants_follow_the_paper():
  base = config_lib.get_config('divided')
  assert (base.variant, base.model.num_frames, base.model.image_size,
          base.data.sampling_rate) == ('base', 8, (224, 224), 32)
  large = config_lib.get_config('divided', 'L')
  assert (large.model.num_frames, large.data.sampling_rate) == (96, 4)
  assert base.model.hidden_size == 768 and base.model.depth == 12
  assert base.model.num_heads == 12 and base.model.mlp_dim == 3072
  assert base.model.layer_norm_eps == 1e-6 and base.model.drop_path == 0.1
  assert set(base.model) == set(model.config_fields())


def test_unknown_scheme_or_variant_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"variant 'xl'.*\['base', 'demo', "
                     r"'hr', 'l', 'tiny'\]"):
    config_lib.get_config('divided', 'xl')
  with pytest.raises(ValueError, match="'axial'.*'space_only'"):
    config_lib.get_config('time_only')
