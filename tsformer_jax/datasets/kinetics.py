"""Kinetics-400 / 600 and other datasets listed in `path label` CSV files.

The original TimeSformer's format (see `HOW_TO`). `synthetic_motion_videos`
is the demo written in it as mp4 files, to run through the same decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
import os

from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_files
from tsformer_jax.datasets import video_writer

HOW_TO = (
    'Each line of a split file is "path label": a video path (relative to '
    'data_dir, or absolute) and its integer class, separated by a space, e.g. '
    '"train/abseiling/0wR5jVB-WPk_000417_000427.mp4 0". Classes number from '
    '0 in the alphabetical order of the class names (as the shipped '
    'tsformer_jax/labels/kinetics400.txt).')


def read_csv(path: str, data_dir: str) -> list[video_files.Entry]:
  """The entries of a `path label` file; paths are joined to `data_dir`.

  Raises:
    ValueError: a line that is not `path label` with an integer label >= 0,
      naming the file and line.
  """
  entries = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      parts = line.rsplit(maxsplit=1)
      try:
        label = int(parts[1]) if len(parts) == 2 else -1
      except ValueError:
        label = -1
      if label < 0:
        raise ValueError(f'{path}:{number}: expected "path label", got '
                         f'{line!r}. {HOW_TO}')
      entries.append(video_files.Entry(os.path.join(data_dir, parts[0]),
                                       label))
  return entries


def write_csv(path: str, entries: Sequence[video_files.Entry],
              data_dir: str):
  """Writes entries as `path label` lines, paths relative to `data_dir`;
  written aside and renamed, so the file appears whole or not at all."""
  lines = [f'{os.path.relpath(e.path, data_dir)} {e.label}\n'
           for e in entries]
  partial = f'{path}.{os.getpid()}.partial'
  with open(partial, 'w', encoding='utf-8') as f:
    f.writelines(lines)
  os.replace(partial, path)


def load(data_dir: str, split_file: str) -> video_files.FileSource:
  """The videos listed in `{data_dir}/{split_file}`."""
  return video_files.FileSource(
      read_csv(os.path.join(data_dir, split_file), data_dir))


def class_names_from_paths(entries: Sequence[video_files.Entry],
                           num_classes: int) -> list[str] | None:
  """Class names from the videos' folders (`.../{class name}/{video}`), or
  None unless every class appears, all its videos in one folder of its own."""
  names: dict[int, str] = {}
  for entry in entries:
    folder = os.path.basename(os.path.dirname(entry.path))
    if names.setdefault(entry.label, folder) != folder:
      return None
  if sorted(names) != list(range(num_classes)):
    return None
  if len(set(names.values())) != num_classes:
    return None
  return [names[i].replace('_', ' ') for i in range(num_classes)]


def class_names_from_csv(data_dir: str, split_file: str,
                         num_classes: int) -> list[str] | None:
  """`class_names_from_paths` of `{data_dir}/{split_file}`, if it exists."""
  path = os.path.join(data_dir, split_file)
  if not data_dir or not os.path.exists(path):
    return None
  return class_names_from_paths(read_csv(path, data_dir), num_classes)


def default_synthetic_dir() -> str:
  """`$XDG_CACHE_HOME/tsformer_jax/synthetic_motion_videos` (else under
  `~/.cache`): where `synthetic_motion_videos` is written when
  `config.data.data_dir` is empty."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'tsformer_jax', 'synthetic_motion_videos')


def prepare_synthetic_motion(data_dir: str, split: str,
                             count: int | None = None,
                             fps: float = 30.0) -> str:
  """Writes `split` of `synthetic_motion` as mp4 files and a CSV file.

  Videos go to `{data_dir}/{split}/{index:05d}.mp4`, listed in `{data_dir}/
  {split}.csv` last; nothing is written if that CSV exists. Every file
  appears whole or not at all, so concurrent writers (same bytes) are safe.

  Args:
    split: 'train' or 'test'.
    count: videos to write; None for the whole split (2048 / 256).

  Returns:
    The CSV file's path.
  """
  csv = os.path.join(data_dir, f'{split}.csv')
  if os.path.exists(csv):
    return csv
  count = synthetic_motion.num_examples(split) if count is None else count
  logging.info('Writing %d synthetic_motion %s videos to %s.', count, split,
               data_dir)
  entries = []
  for index in range(count):
    frames, label = synthetic_motion.generate(split, index)
    path = os.path.join(data_dir, split, f'{index:05d}.mp4')
    video_writer.write_mp4(path, frames, fps)
    entries.append(video_files.Entry(path, label))
  write_csv(csv, entries, data_dir)
  return csv
