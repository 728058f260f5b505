"""A folder of your own videos: one subfolder per class, or listings.

  {data_dir}/train/{class}/{video}   e.g. train/juggling/a.mp4
  {data_dir}/val/{class}/{video}

or, for videos with several labels each (the multi-label form, chosen by
`classes.txt`; `tsformer_jax.listing` reads it):

  {data_dir}/classes.txt             a class name a line
  {data_dir}/train.csv               a/b.mp4 juggling,singing   (or .jsonl)
  {data_dir}/val.csv

Any container PyAV reads (mp4, webm, mkv, avi, ...). The classes are the
subfolders of `train/`, numbered in sorted order; `val/` may lack some of
them but has no others. The 'test' split reads `val/`, so the default
evaluation split works. The files of a class folder are read in sorted
order, its subfolders included (linked ones too, but no folder twice);
files directly in `train/` or `val/` belong to no class and hidden ones (a
leading '.') are left out. A file that is no video is skipped and counted,
as any unreadable video is. In the multi-label form the listings' paths
are relative to data_dir, and labels are multi-hot.
"""

from __future__ import annotations

import os

from tsformer_jax import listing
from tsformer_jax.datasets import video_files

# Split name -> its folder in data_dir.
SPLITS = {'train': 'train', 'val': 'val', 'test': 'val'}
LAYOUT = '{data_dir}/train/{class}/* and {data_dir}/val/{class}/*'
HOW_TO = (
    'Put each video in the folder of its class, e.g. train/juggling/a.mp4 '
    'and val/juggling/b.webm (any container PyAV reads). The classes are the '
    'folders of train/, numbered in sorted order; set '
    '--config.model.num_classes to their count.')
# The multi-label form: the class list, and each split's listing ('a|b':
# either).
CLASSES_FILE = 'classes.txt'
LISTINGS = {'train': 'train.csv|train.jsonl', 'val': 'val.csv|val.jsonl',
            'test': 'val.csv|val.jsonl'}
LISTING_LAYOUT = ('{data_dir}/classes.txt, {data_dir}/train.csv (or .jsonl) '
                  'and {data_dir}/val.csv (or .jsonl)')
LISTING_HOW_TO = (
    'classes.txt names a class a line; train.csv and val.csv list a video a '
    'line, "PATH LABEL1,LABEL2" (PATH relative to data_dir), or as JSON lines'
    ' in train.jsonl and val.jsonl, {"path": PATH, "labels": [...]}. Set '
    '--config.model.num_classes to the count of classes and '
    '--config.model.loss=sigmoid.')


def listing_form(data_dir: str) -> dict[str, object]:
  """Where `data_dir` holds `classes.txt`, the registry fields of the
  multi-label form (`registry.Dataset`: splits, required, layout, how_to,
  load); else none."""
  if not data_dir or not os.path.exists(os.path.join(data_dir, CLASSES_FILE)):
    return {}
  return dict(splits=LISTINGS, required=(CLASSES_FILE,),
              layout=LISTING_LAYOUT, how_to=LISTING_HOW_TO,
              load=load_listing)


def class_names(data_dir: str) -> list[str]:
  """The lines of `{data_dir}/classes.txt` where it exists (the multi-label
  form), else the class folders of `{data_dir}/train`, sorted.

  Raises:
    FileNotFoundError: `data_dir` is empty, or its `train` folder is missing
      or holds no class folder; the message gives the layout.
  """
  if not data_dir:
    raise FileNotFoundError(
        f'config.data.data_dir is empty: set it to the folder of your videos,'
        f' which should hold {LAYOUT}. {HOW_TO}')
  if listing_form(data_dir):
    return listing.read_classes(os.path.join(data_dir, CLASSES_FILE))
  train = os.path.join(data_dir, SPLITS['train'])
  names = _folders(train) if os.path.isdir(train) else []
  if not names:
    state = 'holds no class folder' if os.path.isdir(train) else 'is missing'
    raise FileNotFoundError(f'{train} {state}: the folder dataset expects '
                            f'{LAYOUT}. {HOW_TO}')
  return names


def load(data_dir: str, split_dir: str) -> video_files.FileSource:
  """The videos of `{data_dir}/{split_dir}`, labelled by their class folder.

  Raises:
    FileNotFoundError: see `class_names`.
    ValueError: a class folder of `split_dir` that `train` lacks.
  """
  labels = {name: i for i, name in enumerate(class_names(data_dir))}
  root = os.path.join(data_dir, split_dir)
  folders = _folders(root)
  unknown = [name for name in folders if name not in labels]
  if unknown:
    raise ValueError(
        f'{root} has class folders that {os.path.join(data_dir, "train")} '
        f'lacks: {unknown}. The classes are the folders of train/; add '
        'those there, or remove them here.')
  # Links are followed (datasets are often linked in), but no folder twice:
  # a link back up (train/beta/loop -> ..) or into another class would
  # repeat videos under the wrong label, or loop until the path is too long.
  seen = {_identity(path) for path in [data_dir, root] + [
      os.path.join(root, name) for name in folders]}
  return video_files.FileSource([
      video_files.Entry(path, labels[name]) for name in folders
      for path in _files(os.path.join(root, name), seen)])


def load_listing(data_dir: str, split_file: str) -> video_files.FileSource:
  """The videos of the listing `split_file` (`LISTINGS`: either format) in
  `data_dir`, with multi-hot labels over `classes.txt`.

  Raises:
    FileNotFoundError: neither listing, or classes.txt, is there.
    ValueError: both are there, or a line is malformed or names an unknown
      class (the message names the line).
  """
  names = split_file.split('|')
  found = [n for n in names if os.path.exists(os.path.join(data_dir, n))]
  if len(found) != 1:
    state = 'both' if found else 'neither'
    error = ValueError if found else FileNotFoundError
    raise error(f'{data_dir} holds {state} of {" and ".join(names)}: the '
                f'folder dataset expects one of them, and {LISTING_LAYOUT}. '
                f'{LISTING_HOW_TO}')
  classes = class_names(data_dir)
  items = listing.read(os.path.join(data_dir, found[0]), classes)
  return video_files.FileSource(
      [video_files.Entry(item.path, item.labels) for item in items],
      num_classes=len(classes))


def _folders(directory: str) -> list[str]:
  """The visible folders in `directory`, sorted."""
  return sorted(e.name for e in os.scandir(directory)
                if e.is_dir() and not e.name.startswith('.'))


def _identity(directory: str) -> tuple[int, int]:
  """`(st_dev, st_ino)` of `directory`, links followed: the same for every
  path to it."""
  stat = os.stat(directory)
  return stat.st_dev, stat.st_ino


def _files(directory: str, seen: set[tuple[int, int]]) -> list[str]:
  """The visible files under `directory`, subfolders included, sorted;
  a subfolder whose `_identity` is in `seen` is left out, and the others are
  added to it."""
  paths = []
  for parent, dirs, files in os.walk(directory, followlinks=True):
    visible = sorted(d for d in dirs if not d.startswith('.'))
    dirs[:] = []
    for d in visible:
      identity = _identity(os.path.join(parent, d))
      if identity not in seen:
        seen.add(identity)
        dirs.append(d)
    paths += [os.path.join(parent, f) for f in files if not f.startswith('.')]
  return sorted(paths)
