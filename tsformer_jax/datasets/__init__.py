"""Datasets: the generated demo and the paper's video datasets.

`registry.py` describes each dataset; `get_source(config, split)` turns
`config.data` into a random-access `clip_lib.Source` of labelled
videos. With `config.data.format = 'tfds'` it reads instead the TFDS
dataset that `python -m tsformer_jax.datasets.prepare` wrote
(`tfds_builders.py`): encoded frames in ArrayRecord, read by index
(`tfds_source.py`).

| name | classes | data_dir holds |
|---|---|---|
| synthetic_motion | 2 | nothing: generated in memory |
| synthetic_attributes | 3, several a video | nothing: generated in memory |
| synthetic_motion_videos | 2 | `{split}.csv` + mp4s, written on first use |
| kinetics400, kinetics600 | 400, 600 | `{train,val,test}.csv` (`path label`) |
| ssv2 | 174 | SSv2 label JSONs + `20bn-something-something-v2/` |
| diving48 | 48 | `Diving48_V2_{train,test}.json` + `rgb/` |
| charades | 157, several a video | `frame_lists/*.csv` + `Charades_v1_rgb/` |
| folder | its class folders | `{train,val}/<class>/*`: your own videos |
| folder, multi-label | `classes.txt` | it + `{train,val}.csv` (or `.jsonl`) |

A multi-label source (several classes a video) has `multi_label` True and
`num_classes`, and gives uint8 multi-hot labels `[num_classes]`; others
give class indices.
"""

from tsformer_jax import clip_lib
from tsformer_jax.datasets.registry import ALIASES
from tsformer_jax.datasets.registry import DATASETS
from tsformer_jax.datasets.registry import Dataset
from tsformer_jax.datasets.registry import class_names
from tsformer_jax.datasets.registry import data_dir
from tsformer_jax.datasets.registry import file_source
from tsformer_jax.datasets.registry import get_dataset

FORMATS = ('files', 'tfds')

__all__ = ['ALIASES', 'DATASETS', 'FORMATS', 'Dataset', 'class_names',
           'data_dir', 'file_source', 'get_dataset', 'get_source',
           'is_multi_label']


def get_source(config, split: str) -> clip_lib.Source:
  """The videos of `split` of `config.data.dataset`.

  `config.data.format` says where they are read: 'files' decodes the
  dataset's own files in `data_dir` (`registry.file_source`); 'tfds' reads
  the TFDS dataset prepared in `tfds_dir` (`tfds_source.load`).

  Raises:
    ValueError: an unknown dataset, split or format, a model whose class
      count is not the dataset's, labels beyond `config.model.num_classes`,
      or a multi-label dataset with `config.model.loss` 'softmax'.
    FileNotFoundError: the dataset's files are missing; the message names
      the files expected, where, and how to prepare them.
  """
  data_format = config.data.format
  if data_format not in FORMATS:
    raise ValueError(f'Unknown config.data.format {data_format!r}; '
                     f'valid: {list(FORMATS)}.')
  _check_classes(config)
  if data_format == 'tfds':
    # Imported here: TFDS loads TensorFlow, which reading files does not
    # need.
    from tsformer_jax.datasets import tfds_source
    source = tfds_source.load(config, split)
  else:
    source = file_source(config, split)
  _check_loss(config, source)
  return source


def is_multi_label(source: clip_lib.Source) -> bool:
  """Whether `source`'s labels are multi-hot (several classes a video)."""
  return bool(getattr(source, 'multi_label', False))


def _check_loss(config, source: clip_lib.Source):
  """Softmax cross-entropy has one class a video to put its mass on."""
  if is_multi_label(source) and config.model.loss == 'softmax':
    raise ValueError(
        f'{config.data.dataset} has several labels per video, but '
        "config.model.loss is 'softmax' (one class per video): set "
        '--config.model.loss=sigmoid.')


def _check_classes(config):
  """A dataset of fixed classes needs a head of as many: a different count
  most often means `config.data.dataset` was overridden alone, without the
  recipe (classes, flips, sampling) that its config arg sets."""
  dataset = get_dataset(config.data.dataset)
  num_classes, want = config.model.num_classes, dataset.num_classes
  if not want or not num_classes or num_classes == want or (
      dataset.subsets and num_classes < want):
    return
  raise ValueError(
      f'config.data.dataset {dataset.name} has {want} classes, but '
      f'config.model.num_classes is {num_classes}. Select the dataset with '
      'the config arg, which sets its recipe too (e.g. --config=configs/'
      f'{config.model.attention}.py:base,{dataset.name}), or set '
      f'--config.model.num_classes={want}.')
