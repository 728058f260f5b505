"""The config files: variants, errors, and loading through config_flags."""

import pathlib
import subprocess
import sys

from ml_collections import config_flags
import pytest

from tsformer_jax import attention
from tsformer_jax import config_lib
from tsformer_jax import model
from tsformer_jax.configs import default

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
  with pytest.raises(ValueError, match=r"'xl'.*variant: \['base', 'demo', "
                     r"'hr', 'l', 'tiny'\]"):
    config_lib.get_config('divided', 'xl')
  with pytest.raises(ValueError, match=r"variant 'xl'; valid: \['base', "):
    config_lib.get_config('divided', 'variant=xl')
  with pytest.raises(ValueError, match=r"key 'frames'.*\['attention', "
                     r"'dataset', 'variant'\]"):
    config_lib.get_config('divided', 'frames=16')
  with pytest.raises(ValueError, match="'axial'.*'space_only'"):
    config_lib.get_config('time_only')


def test_key_value_args_and_shorthands_are_the_same_config():
  parse = config_flags.config_flags._ConfigFileParser(  # pylint: disable=protected-access
      name='config').parse
  long = parse(f'{CONFIGS}/default.py:variant=hr,dataset=ssv2,'
               'attention=joint')
  short = parse(f'{CONFIGS}/joint.py:hr,ssv2')
  assert long.to_dict() == short.to_dict()
  assert (long.model.attention, long.data.dataset, long.model.num_frames,
          long.model.num_classes) == ('joint', 'ssv2', 16, 174)
  assert parse(f'{CONFIGS}/default.py').model.attention == 'divided'


def test_every_dataset_recipe_matches_the_registry():
  from tsformer_jax import datasets  # pylint: disable=g-import-not-at-top
  for name in datasets.DATASETS:
    config = config_lib.get_config('divided', name)
    assert config.data.dataset == name
    assert config.model.num_classes == datasets.DATASETS[name].num_classes
  assert set(default.DATASETS) == set(datasets.DATASETS)
  assert default.ALIASES == datasets.ALIASES


def test_configs_saved_with_a_dataset_section_are_upgraded():
  old = config_lib.get_config('divided', 'tiny').to_dict()
  data = old.pop('data')
  dataset_fields = ('dataset', 'data_dir', 'train_split', 'eval_split',
                    'format', 'tfds_dir')
  old['dataset'] = dict(name='ssv2', data_dir='/d', train_split='train',
                        eval_split='val', format='tfds', tfds_dir='/t')
  old['data'] = {k: v for k, v in data.items() if k not in dataset_fields}
  new = config_lib.upgrade(old)
  assert 'dataset' not in new
  assert {k: new['data'][k] for k in dataset_fields} == dict(
      dataset='ssv2', data_dir='/d', train_split='train', eval_split='val',
      format='tfds', tfds_dir='/t')
  assert config_lib.upgrade(new) == new


@pytest.mark.slow
def test_importing_the_package_loads_no_video_or_tensorflow_stack():
  code = ('import sys, tsformer_jax; print(sorted(m for m in ("av", '
          '"tensorflow", "huggingface_hub", "torch") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == '[]'
