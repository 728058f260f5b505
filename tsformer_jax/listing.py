"""Listings of labelled videos: one video per line, each with its labels.

Two formats, told apart by the file name:

  *.jsonl        {"path": "a/b.mp4", "labels": ["juggling", "singing"]}
  anything else  a/b.mp4 juggling,singing

In the second, the labels are the last space-separated field (a path with
spaces needs JSON lines, or a tab before the labels). A label is a class
name or a class index; a line with no label gives a video with none, which
a multi-label dataset reads as all negatives. Blank lines and lines that
start with '#' are skipped. Relative paths are relative to the listing's
folder. Reads no video: a listing is checked whole before any decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class Item:
  """One line of a listing.

  Attributes:
    path: the video file.
    labels: its class indices, sorted, without repeats; empty for none.
    line: its line number in the listing (from 1), for messages.
  """
  path: str
  labels: tuple[int, ...]
  line: int


def read_classes(path: str) -> list[str]:
  """Class names, one per line of `path` (blank lines skipped).

  Raises:
    FileNotFoundError: `path` is missing.
    ValueError: a name appears twice.
  """
  with open(path) as f:
    names = [line.strip() for line in f if line.strip()]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f'{path}: classes listed twice: {repeated}; each class '
                     'name must appear once.')
  return names


def read(path: str, classes: Sequence[str]) -> list[Item]:
  """The videos of the listing `path`, labels as indices into `classes`.

  Raises:
    FileNotFoundError: `path` is missing.
    ValueError: a malformed line or a label outside `classes`; the message
      names the file and line.
  """
  index = {name: i for i, name in enumerate(classes)}
  parse = _json_line if path.endswith('.jsonl') else _text_line
  folder = os.path.dirname(os.path.abspath(path))
  items = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip() or line.lstrip().startswith('#'):
        continue
      where = f'{path}:{number}'
      video, labels = parse(line, where)
      items.append(Item(os.path.join(folder, video),
                        _indices(labels, index, where), number))
  return items


def multi_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
  """uint8 `[num_classes]`: 1 at each of `labels`."""
  target = np.zeros((num_classes,), np.uint8)
  target[list(labels)] = 1
  return target


def _text_line(line: str, where: str) -> tuple[str, list[str]]:
  fields = (line.rstrip('\n').split('\t') if '\t' in line
            else line.split())
  fields = [f.strip() for f in fields if f.strip()]
  if len(fields) > 2:
    raise ValueError(f'{where}: expected "PATH LABEL[,LABEL...]", got '
                     f'{len(fields)} fields; put a tab before the labels of a'
                     ' path with spaces, or use JSON lines (.jsonl).')
  labels = fields[1].split(',') if len(fields) == 2 else []
  return fields[0], [label.strip() for label in labels if label.strip()]


def _json_line(line: str, where: str) -> tuple[str, list[str]]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{where}: not JSON ({e.msg}); each line of a .jsonl '
                     'listing is {"path": ..., "labels": [...]}.') from None
  if not isinstance(record, dict) or not isinstance(record.get('path'), str):
    raise ValueError(f'{where}: expected {{"path": ..., "labels": [...]}}, '
                     f'got {line.strip()[:80]}.')
  labels = record.get('labels', [])
  if not isinstance(labels, list):
    labels = [labels]
  return record['path'], [str(label) for label in labels]


def _indices(labels: Sequence[str], index: dict[str, int], where: str
             ) -> tuple[int, ...]:
  """Class indices of `labels`, names first, then integers in range."""
  found = set()
  for label in labels:
    if label in index:
      found.add(index[label])
    elif label.isdigit() and int(label) < len(index):
      found.add(int(label))
    else:
      raise ValueError(
          f'{where}: unknown label {label!r}; a label is one of the '
          f'{len(index)} class names (e.g. {list(index)[:3]}) or an index '
          f'below {len(index)}. Fix the line, or add the class.')
  return tuple(sorted(found))
