"""The registry of datasets: what each is, where its files lie, how to
read them.

`DATASETS` describes each dataset once: its splits and the file each reads,
the files it needs, how to obtain them, and where its class names come
from. `file_source(config, split)` reads a split from the dataset's own
files, failing at once, with the layout it expects, when files are missing.
What each dataset is (its classes, flips, temporal sampling, pixels) is
written in `configs/dataset_facts.py`, which the config's recipe also reads.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import importlib.resources
import os

from tsformer_jax import clip_lib
from tsformer_jax.configs import dataset_facts
from tsformer_jax.datasets import charades
from tsformer_jax.datasets import diving48
from tsformer_jax.datasets import folder
from tsformer_jax.datasets import kinetics
from tsformer_jax.datasets import ssv2
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_files


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One dataset of the registry.

  Attributes:
    name: its key in `DATASETS` and `dataset_facts.DATASETS`
      (`config.data.dataset`).
    splits: split name -> the file listing it, relative to `data_dir`
      (for a dataset not on disk, what `load` takes).
    load: `(data_dir, split_file) -> Source`.
    on_disk: whether it reads files from `data_dir`.
    required: files or folders that every split needs besides its own
      file, relative to `data_dir`; 'a|b' accepts either.
    layout: what `data_dir` holds, for error messages.
    how_to: how to obtain and lay out the data, for error messages.
    names: `data_dir -> class names`, from the data (None where it does
      not tell them).
    labels_file: the shipped class names (in `tsformer_jax/labels/`), used
      where `names` gives none.
    prepare: `(data_dir, split)`, run before loading: writes generated
      data that is missing.
    default_dir: the `data_dir` used when `config.data.data_dir` is
      empty; None means it must be set.
    subsets: whether a model may have fewer classes than `num_classes`
      (Kinetics: the CSVs list any labels, e.g. Mini-Kinetics' 200);
      otherwise it must have exactly as many.
    forms: `data_dir -> fields`: where the folder holds another layout of
      the dataset (`folder`'s listings of several labels per video), the
      fields (`splits`, `load`, ...) that differ; {} for this one.
  """
  name: str
  splits: dict[str, str]
  load: Callable[[str, str], clip_lib.Source]
  on_disk: bool = True
  required: tuple[str, ...] = ()
  layout: str = ''
  how_to: str = ''
  names: Callable[[str], list[str] | None] | None = None
  labels_file: str | None = None
  prepare: Callable[[str, str], object] | None = None
  default_dir: Callable[[], str] | None = None
  subsets: bool = False
  forms: Callable[[str], dict[str, object]] | None = None

  @property
  def num_classes(self) -> int:
    """Its classes (`dataset_facts`); 0 where the data tells them (`names`),
    and the model must have exactly those."""
    return dataset_facts.DATASETS[self.name].num_classes


def _kinetics(name: str, labels_file: str | None = None) -> Dataset:
  """Kinetics as its CSVs list it; its class names from `labels_file` where
  one is shipped, else from the folders of its training videos."""
  names = None
  if labels_file is None:
    names = functools.partial(
        kinetics.class_names_from_csv, split_file='train.csv',
        num_classes=dataset_facts.DATASETS[name].num_classes)
  return Dataset(
      name=name, splits={s: f'{s}.csv' for s in ('train', 'val', 'test')},
      load=kinetics.load,
      layout='{data_dir}/{train,val,test}.csv listing the videos',
      how_to=kinetics.HOW_TO, names=names, labels_file=labels_file,
      subsets=True)


_SSV2_LISTS = {'train': 'something-something-v2-train.json',
               'val': 'something-something-v2-validation.json',
               'test': 'something-something-v2-validation.json'}
_DIVING48_LISTS = {'train': 'Diving48_V2_train.json',
                   'val': 'Diving48_V2_test.json',
                   'test': 'Diving48_V2_test.json'}

DATASETS = {d.name: d for d in [
    Dataset(
        name='synthetic_motion',
        splits={s: s for s in synthetic_motion.SPLITS},
        load=lambda data_dir, split: synthetic_motion.Source(split),
        on_disk=False,
        names=lambda data_dir: list(synthetic_motion.CLASSES)),
    Dataset(
        name='synthetic_attributes',
        splits={s: s for s in synthetic_motion.SPLITS},
        load=lambda data_dir, split: synthetic_motion.AttributesSource(split),
        on_disk=False,
        names=lambda data_dir: list(synthetic_motion.ATTRIBUTES)),
    Dataset(
        name='synthetic_motion_videos',
        splits={s: f'{s}.csv' for s in synthetic_motion.SPLITS},
        load=kinetics.load,
        names=lambda data_dir: list(synthetic_motion.CLASSES),
        layout='{data_dir}/{train,test}.csv and {train,test}/*.mp4',
        how_to='They are written on first use; delete the folder to write '
        'them again.',
        prepare=kinetics.prepare_synthetic_motion,
        default_dir=kinetics.default_synthetic_dir),
    _kinetics('kinetics400', labels_file='kinetics400.txt'),
    _kinetics('kinetics600'),
    Dataset(
        name='ssv2', splits=_SSV2_LISTS, load=ssv2.load,
        required=(ssv2.LABELS_FILE, '|'.join(ssv2.VIDEO_DIRS)),
        layout=(f'{{data_dir}}/{ssv2.LABELS_FILE}, '
                f'{{data_dir}}/{_SSV2_LISTS["train"]}, '
                f'{{data_dir}}/{_SSV2_LISTS["val"]} and the videos as '
                f'{{data_dir}}/{ssv2.VIDEO_DIRS[0]}/{{id}}.webm (or '
                f'{{data_dir}}/{ssv2.VIDEO_DIRS[1]}/{{id}}.webm)'),
        how_to=ssv2.HOW_TO, names=ssv2.class_names,
        labels_file='something_something_v2.txt'),
    Dataset(
        name='diving48', splits=_DIVING48_LISTS, load=diving48.load,
        required=(diving48.VIDEO_DIR,),
        layout=(f'{{data_dir}}/{_DIVING48_LISTS["train"]}, '
                f'{{data_dir}}/{_DIVING48_LISTS["test"]} and the videos as '
                f'{{data_dir}}/{diving48.VIDEO_DIR}/{{vid_name}}.mp4'),
        how_to=diving48.HOW_TO, labels_file='diving48.txt'),
    Dataset(
        name='charades', splits=charades.SPLITS, load=charades.load,
        required=(charades.FRAMES_DIR,), layout=charades.LAYOUT,
        how_to=charades.HOW_TO, names=charades.class_names),
    Dataset(
        name='folder', splits=folder.SPLITS, load=folder.load,
        required=(folder.SPLITS['train'],), layout=folder.LAYOUT,
        how_to=folder.HOW_TO, names=folder.class_names,
        forms=folder.listing_form),
]}
# Other names accepted for a dataset (`config.data.dataset`).
ALIASES = dataset_facts.ALIASES


def get_dataset(name: str) -> Dataset:
  """The registry's entry for `name` (or an alias of it).

  Raises:
    ValueError: an unknown name, listing the valid ones.
  """
  return DATASETS[dataset_facts.get(name).name]


def data_dir(config) -> str:
  """`config.data.data_dir`, else the dataset's default folder.

  Raises:
    FileNotFoundError: neither is set, with the layout the dataset needs.
  """
  dataset = get_dataset(config.data.dataset)
  if not dataset.on_disk:
    return ''
  if config.data.data_dir:
    return os.path.expanduser(config.data.data_dir)
  if dataset.default_dir is not None:
    return dataset.default_dir()
  raise FileNotFoundError(
      f'config.data.data_dir is empty: set it to the folder of '
      f'{dataset.name} (e.g. --config.data.data_dir=/data/{dataset.name}'
      f'), which should hold {dataset.layout}. {dataset.how_to}')


def file_source(config, split: str, num_classes: int | None = None
                ) -> clip_lib.Source:
  """The videos of `split` of `config.data.dataset`, from its own files.

  Args:
    num_classes: the class count the labels must fit; None for
      `config.model.num_classes` (what a model reads; `prepare` reads no
      model and passes the dataset's).

  Raises:
    ValueError: an unknown dataset or split, or labels beyond
      `num_classes`; for a dataset whose data tells its classes, another
      count of them.
    FileNotFoundError: the dataset's files are missing; the message names
      the files expected, where, and how to prepare them.
  """
  dataset = get_dataset(config.data.dataset)
  if split not in dataset.splits:
    raise ValueError(f'Unknown split {split!r} of {dataset.name}; valid: '
                     f'{sorted(dataset.splits)}.')
  root = data_dir(config)
  if dataset.forms is not None:
    dataset = dataclasses.replace(dataset, **dataset.forms(root))
  if dataset.prepare is not None:
    dataset.prepare(root, split)
  split_file = dataset.splits[split]
  if dataset.on_disk:
    _check_files(dataset, root, split_file)
  if num_classes is None:
    num_classes = config.model.num_classes
  if not dataset.num_classes:
    check_class_count(len(dataset.names(root)), num_classes,
                      f'The {dataset.name} dataset {root!r}')
  source = dataset.load(root, split_file)
  if isinstance(source, video_files.FileSource):
    _check_source(dataset, source, _first_existing(root, split_file),
                  num_classes)
  return source


def check_class_count(count: int, num_classes: int, what: str):
  """For a dataset whose data tells its classes (`Dataset.num_classes` 0):
  fails unless the model has as many, `count` (`what` holds them)."""
  if num_classes != count:
    raise ValueError(
        f'{what} has {count} classes, but config.model.num_classes is '
        f'{num_classes}: set --config.model.num_classes={count}.')


def _check_files(dataset: Dataset, root: str, split_file: str):
  missing = [paths for paths in dict.fromkeys((split_file,) +
                                             dataset.required)
             if not any(os.path.exists(os.path.join(root, p))
                        for p in paths.split('|'))]
  if missing:
    names = ', '.join(' or '.join(p.split('|')) for p in missing)
    raise FileNotFoundError(
        f'Dataset {dataset.name} is missing {names} in {root!r}. It expects '
        f'{dataset.layout}. {dataset.how_to}')


def _first_existing(root: str, paths: str) -> str:
  """The first of `paths` ('a|b') that exists in `root`, else the first."""
  names = paths.split('|')
  found = [n for n in names if os.path.exists(os.path.join(root, n))]
  return os.path.join(root, (found or names)[0])


def _check_source(dataset: Dataset, source: video_files.FileSource,
                  split_path: str, num_classes: int):
  """Fails on an empty list, on a list none of whose first videos exist
  (a wrong data_dir or path prefix), and on labels the model lacks (a
  multi-label source's labels are as many as its classes, checked
  before)."""
  if not len(source):
    raise ValueError(f'{split_path} lists no videos.')
  first = [e.path for e in source.entries[:10]]
  if not any(os.path.exists(p) for p in first):
    raise FileNotFoundError(
        f'None of the first {len(first)} videos listed in {split_path} '
        f'exists (e.g. {first[0]!r}): is data_dir right? It expects '
        f'{dataset.layout}. {dataset.how_to}')
  if source.multi_label:
    return
  top = int(source.labels.max())
  if num_classes and top >= num_classes:
    raise ValueError(
        f'{split_path} has class {top}, but config.model.num_classes is '
        f'{num_classes}; {dataset.name} has {dataset.num_classes} classes: '
        f'select it with the config arg (e.g. configs/divided.py:base,'
        f'{dataset.name}) or set --config.model.num_classes.')


def class_names(config) -> list[str]:
  """Class names by index for `config.data.dataset`.

  From the data where it tells them (SSv2's labels file; the folders of
  Kinetics-600's training videos, `.../{class name}/{video}.mp4`, where each
  class has a folder of its own; the class folders of `folder`), else from
  the lists shipped in `tsformer_jax/labels/` (Kinetics-400, SSv2,
  Diving-48), else index strings ('0', '1', ...).
  """
  dataset = get_dataset(config.data.dataset)
  root = os.path.expanduser(config.data.data_dir)
  names = dataset.names(root) if dataset.names is not None else None
  if names is None and dataset.labels_file:
    names = list(_shipped_names(dataset.labels_file))
  if names is None:
    names = [str(i) for i in range(dataset.num_classes)]
  if dataset.num_classes and len(names) != dataset.num_classes:
    raise ValueError(f'{len(names)} class names for {dataset.name}, which '
                     f'has {dataset.num_classes} classes.')
  return names


@functools.cache
def _shipped_names(file_name: str) -> tuple[str, ...]:
  text = importlib.resources.files('tsformer_jax').joinpath(
      'labels', file_name).read_text(encoding='utf-8')
  return tuple(line.strip() for line in text.splitlines() if line.strip())
