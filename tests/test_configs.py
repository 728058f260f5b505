"""The config files: variants, errors, and loading through config_flags."""

import pathlib
import re
import subprocess
import sys

from ml_collections import config_flags
import pytest

from tsformer_jax import attention
from tsformer_jax import checkpoints
from tsformer_jax import config_lib
from tsformer_jax import model
from tsformer_jax.configs import dataset_facts

ROOT = pathlib.Path(__file__).parent.parent
CONFIGS = ROOT / 'configs'


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
  """The config and the registry read one table of facts."""
  from tsformer_jax import datasets  # pylint: disable=g-import-not-at-top
  assert set(datasets.DATASETS) == set(dataset_facts.DATASETS)
  for name, facts in dataset_facts.DATASETS.items():
    config = config_lib.get_config('divided', f'hr,{name}')
    assert config.data.dataset == name
    assert config.model.num_classes == facts.num_classes
    assert datasets.get_dataset(name).num_classes == facts.num_classes
    assert {k: config.data[k] for k in dataset_facts.DATA_FIELDS} == (
        facts.data_fields())
    assert config.model.num_frames == facts.frames.get('hr', 16)
    assert (config.init_from.path != config_lib.SCRATCH) == facts.pretrained
  for alias, name in dataset_facts.ALIASES.items():
    assert config_lib.get_config('divided', alias).data.dataset == name
    assert datasets.get_dataset(alias.upper()).name == name
  for read in (datasets.get_dataset,
               lambda n: config_lib.get_config('divided', f'dataset={n}')):
    with pytest.raises(ValueError, match=r"^Unknown dataset 'k700'; valid: "
                       r"\['charades', 'diving48', .*\(aliases: \['k400', "):
      read('k700')


def test_the_class_counts_are_the_shipped_lists_and_written_once():
  from tsformer_jax.datasets import synthetic_motion  # pylint: disable=g-import-not-at-top
  labels = ROOT / 'tsformer_jax' / 'labels'
  shipped = {name: len((labels / file).read_text().strip().splitlines())
             for name, file in (('kinetics400', 'kinetics400.txt'),
                                ('ssv2', 'something_something_v2.txt'),
                                ('diving48', 'diving48.txt'))}
  shipped['synthetic_motion'] = len(synthetic_motion.CLASSES)
  assert shipped == {n: dataset_facts.DATASETS[n].num_classes
                     for n in shipped}
  # No other source restates a count, as `num_classes=174` or `== 400`.
  counts = {f.num_classes for f in dataset_facts.DATASETS.values()} - {0}
  sources = [*CONFIGS.glob('*.py'), *(ROOT / 'tsformer_jax').rglob('*.py')]
  written = [f'{path.relative_to(ROOT)}: {match[0]}' for path in sources
             if path.name != 'dataset_facts.py'
             for match in re.finditer(r'num_classes\s*==?\s*(\d+)',
                                      path.read_text(encoding='utf-8'))
             if int(match[1]) in counts]
  assert not written, written


# `config.data` fields added since runs first saved their configs (with
# their checkpoints), each with the value a run saved before it had, as the
# repository's history shows: where today's recipe would change its
# numbers, the older value; otherwise today's.
OLDER_RUNS = {
    'sampling': 'rate', 'format': 'files', 'tfds_dir': '',
    'test_clip_stride': 0.0, 'class_names': (), 'test_clip_positions': 'paper',
    'decode_timeout_s': 60.0, 'worker_type': 'process',
    'channel_order': 'rgb', 'segment_fps': 0.0, 'scale_jitter': 'uniform',
    'resize': 'antialias', 'test_view_scores': 'softmax_mean'}
# The other sections' fields added since then; they had their value today.
ADDED_ELSEWHERE = (('model', 'remat'), ('optimizer', 'state_dtype'),
                   ('on_nonfinite',), ('sharding',))


def first_saved_layout(config) -> dict:
  """`config` as the first checkpoints saved it: without the fields added
  since, and its dataset in a section of its own."""
  old = checkpoints.config_to_json(config)
  for key in OLDER_RUNS:
    del old['data'][key]
  for path in ADDED_ELSEWHERE:
    del (old[path[0]] if len(path) > 1 else old)[path[-1]]
  data = old['data']
  old['dataset'] = dict(name=data.pop('dataset'),
                        **{k: data.pop(k) for k in ('data_dir',
                                                    'train_split',
                                                    'eval_split')})
  return old


def test_a_config_saved_before_the_newer_fields_reads_back_with_them():
  today = config_lib.get_config('divided', 'tiny')
  today.data.update(data_dir='/d', eval_split='val')
  old = first_saved_layout(today)
  assert 'remat' not in old['model'] and 'dataset' not in old['data']
  upgraded = checkpoints.config_from_json(old)
  want = today.to_dict()
  want['data'].update(OLDER_RUNS)
  assert upgraded.to_dict() == want
  assert config_lib.upgrade(upgraded).to_dict() == want  # Once is all.
  # An SSv2 run's config from before its pixels and segments were the
  # original's: what it saved stays, what it lacked is as it ran.
  ssv2 = checkpoints.config_to_json(config_lib.get_config('divided',
                                                          'tiny,ssv2'))
  for key in ('channel_order', 'segment_fps', 'scale_jitter', 'resize',
              'test_view_scores'):
    del ssv2['data'][key]
  data = checkpoints.config_from_json(ssv2).data
  assert (data.flip, data.sampling, data.channel_order, data.segment_fps,
          data.scale_jitter, data.resize, data.test_view_scores) == (
              False, 'segments', 'rgb', 0.0, 'uniform', 'antialias',
              'softmax_mean')


def test_a_config_made_by_hand_gets_todays_recipe():
  """Without a data section, a config was not saved by a run: whatever it
  lacks is today's recipe of its variant."""
  model = dict(config_lib.get_config('joint', 'tiny').model)
  del model['remat']
  config = config_lib.upgrade({'variant': 'tiny', 'model': model})
  assert config.to_dict() == config_lib.get_config('joint', 'tiny').to_dict()


@pytest.mark.slow
def test_importing_the_package_loads_no_video_or_tensorflow_stack():
  code = ('import sys, tsformer_jax; print(sorted(m for m in ("av", '
          '"tensorflow", "huggingface_hub", "torch") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == '[]'
