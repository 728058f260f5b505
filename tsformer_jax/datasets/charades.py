"""Charades as PySlowFast lays it out: JPEG frames and frame lists.

  {data_dir}/frame_lists/train.csv   PySlowFast's frame lists: a header,
  {data_dir}/frame_lists/val.csv     then a row per frame,
      original_vido_id video_id frame_id path labels
  {data_dir}/Charades_v1_rgb/        the frames, `path` relative to it
  {data_dir}/Charades_v1_classes.txt optional: the class names

A video is its rows' frames in order (24 fps JPEGs, decoded on demand);
`labels` are a frame's class indices, comma-separated ('""' for none). A
video's labels are the union over all its frames: PySlowFast's video-level
labels (`convert_to_video_level_labels`), which it evaluates on. (It
trains on the union over the frames a training clip spans instead; here
every split takes the whole video's.) 'test' reads the val list, as
PySlowFast's test mode does.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import numpy as np

from tsformer_jax import frame_files
from tsformer_jax import listing
from tsformer_jax.configs import dataset_facts
from tsformer_jax.datasets import video_files

FRAMES_DIR = 'Charades_v1_rgb'
CLASSES_FILE = 'Charades_v1_classes.txt'
SPLITS = {'train': 'frame_lists/train.csv', 'val': 'frame_lists/val.csv',
          'test': 'frame_lists/val.csv'}
# The frame rate of Charades_v1_rgb.
FPS = 24.0
_HEADER = 'original_vido_id'
LAYOUT = ('{data_dir}/frame_lists/train.csv, {data_dir}/frame_lists/val.csv '
          f'(PySlowFast\'s frame lists) and the frames under '
          f'{{data_dir}}/{FRAMES_DIR}/')
HOW_TO = (
    'Download the RGB frames (http://ai2-website.s3.amazonaws.com/data/'
    'Charades_v1_rgb.tar) and untar them in data_dir, and PySlowFast\'s '
    'frame lists (https://dl.fbaipublicfiles.com/pyslowfast/dataset/'
    'charades/frame_lists/train.csv and .../val.csv) into '
    '{data_dir}/frame_lists/; Charades_v1_classes.txt (from '
    'Charades_v1.zip) beside them names the classes.')


def class_names(data_dir: str) -> list[str]:
  """The class names of `{data_dir}/Charades_v1_classes.txt` ('c000
  Holding some clothes' a line; the text after the id), else the ids,
  'c000' to 'c156'."""
  count = dataset_facts.DATASETS['charades'].num_classes
  path = os.path.join(data_dir, CLASSES_FILE)
  if not data_dir or not os.path.exists(path):
    return [f'c{i:03d}' for i in range(count)]
  lines = listing.read_classes(path)
  names = [line.partition(' ')[2].strip() or line for line in lines]
  if len(names) != count:
    raise ValueError(f'{path} names {len(names)} classes; Charades has '
                     f'{count}, one a line ("c000 Holding some clothes").')
  return names


class FrameSource(video_files.FileSource):
  """Videos of frame files with multi-hot labels, as a `clip_lib.Source`:
  `entries[i].path` is video i's frame folder, `frames[i]` its frames."""

  def __init__(self, entries: Sequence[video_files.Entry],
               frames: Sequence[Sequence[str]], num_classes: int,
               fps: float = FPS):
    super().__init__(entries, num_classes)
    self.frames, self.fps = list(frames), fps

  def __getitem__(self, index: int
                  ) -> tuple[frame_files.FrameFiles, np.ndarray]:
    return (frame_files.FrameFiles(self.frames[index], self.fps),
            self._label(self.entries[index]))


def load(data_dir: str, split_file: str) -> FrameSource:
  """The videos of the frame list `split_file` in `data_dir`.

  Raises:
    ValueError: a list without PySlowFast's header, a row without its five
      fields or with a label outside the classes; the message names the
      line.
  """
  count = dataset_facts.DATASETS['charades'].num_classes
  videos = read_frame_list(os.path.join(data_dir, split_file), count)
  root = os.path.join(data_dir, FRAMES_DIR)
  frames = [frame_files.numbered([os.path.join(root, p) for p in paths])
            for paths, _ in videos.values()]
  entries = [video_files.Entry(os.path.dirname(f[0]), tuple(sorted(labels)))
             for f, (_, labels) in zip(frames, videos.values(), strict=True)]
  return FrameSource(entries, frames, count)


def read_frame_list(path: str, num_classes: int
                    ) -> dict[str, tuple[list[str], set[int]]]:
  """PySlowFast's frame list `path`: video id -> (its frame paths in order,
  the union of its frames' labels), videos in the order listed."""
  videos = {}
  with open(path) as f:
    if not f.readline().startswith(_HEADER):
      raise ValueError(f'{path}:1: expected PySlowFast\'s header '
                       f'"{_HEADER} video_id frame_id path labels".')
    for number, line in enumerate(f, start=2):
      row = line.split()
      if not row:
        continue
      if len(row) != 5:
        raise ValueError(f'{path}:{number}: expected 5 space-separated '
                         f'fields ({_HEADER} video_id frame_id path labels),'
                         f' got {len(row)}.')
      paths, labels = videos.setdefault(row[0], ([], set()))
      paths.append(row[3])
      labels.update(_labels(row[4], num_classes, f'{path}:{number}'))
  return videos


def _labels(field: str, num_classes: int, where: str) -> list[int]:
  """'3,17' -> [3, 17]; '""' -> []."""
  labels = [x for x in field.replace('"', '').split(',') if x]
  if not all(x.isdigit() and int(x) < num_classes for x in labels):
    raise ValueError(f'{where}: labels {field!r} are not class indices '
                     f'below {num_classes} separated by commas.')
  return [int(x) for x in labels]
