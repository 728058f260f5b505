"""A dataset of video files: labelled entries as a `clip_lib.Source`.

Each item is a `video_io.VideoFile`, decoded on demand (in a loader worker);
the datasets that list their files (`kinetics`, `ssv2`, `diving48`,
`folder`) build a `FileSource` of `Entry`s.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np

from tsformer_jax import video_io


@dataclasses.dataclass(frozen=True)
class Entry:
  """One labelled video of a dataset of files.

  Attributes:
    path: the video file.
    label: its class index.
    start: the video's first frame within the file.
    end: the frame after its last; None for the end of the file.
  """
  path: str
  label: int
  start: int = 0
  end: int | None = None


class FileSource:
  """Labelled video files as a random-access `clip_lib.Source`."""

  def __init__(self, entries: Sequence[Entry]):
    self.entries = list(entries)

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> tuple[video_io.VideoFile, int]:
    entry = self.entries[index]
    return video_io.VideoFile(entry.path, entry.start, entry.end), entry.label

  @property
  def labels(self) -> np.ndarray:
    """int64 `[len(self)]`."""
    return np.asarray([e.label for e in self.entries], np.int64)
