"""A folder of your own videos: one subfolder per class.

  {data_dir}/train/{class}/{video}   e.g. train/juggling/a.mp4
  {data_dir}/val/{class}/{video}

Any container PyAV reads (mp4, webm, mkv, avi, ...). The classes are the
subfolders of `train/`, numbered in sorted order; `val/` may lack some of
them but has no others. The 'test' split reads `val/`, so the default
evaluation split works. The files of a class folder are read in sorted
order, its subfolders included (linked ones too, but no folder twice);
files directly in `train/` or `val/` belong to no class and hidden ones (a
leading '.') are left out. A file that is no video is skipped and counted,
as any unreadable video is.
"""

from __future__ import annotations

import os

from tsformer_jax.datasets import video_files

# Split name -> its folder in data_dir.
SPLITS = {'train': 'train', 'val': 'val', 'test': 'val'}
LAYOUT = '{data_dir}/train/{class}/* and {data_dir}/val/{class}/*'
HOW_TO = (
    'Put each video in the folder of its class, e.g. train/juggling/a.mp4 '
    'and val/juggling/b.webm (any container PyAV reads). The classes are the '
    'folders of train/, numbered in sorted order; set '
    '--config.model.num_classes to their count.')


def class_names(data_dir: str) -> list[str]:
  """The class folders of `{data_dir}/train`, sorted.

  Raises:
    FileNotFoundError: `data_dir` is empty, or its `train` folder is missing
      or holds no class folder; the message gives the layout.
  """
  if not data_dir:
    raise FileNotFoundError(
        f'config.data.data_dir is empty: set it to the folder of your videos,'
        f' which should hold {LAYOUT}. {HOW_TO}')
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
