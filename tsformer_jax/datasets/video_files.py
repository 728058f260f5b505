"""A dataset of video files: labelled entries as a `clip_lib.Source`.

Each item is a `video_io.VideoFile`, decoded on demand (in a loader worker);
the datasets that list their files (`kinetics`, `ssv2`, `diving48`,
`folder`) build a `FileSource` of `Entry`s. A multi-label dataset (several
classes per video) gives each entry a tuple of classes and its source the
class count: its labels are then uint8 multi-hot `[num_classes]`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np

from tsformer_jax import listing
from tsformer_jax import video_io


@dataclasses.dataclass(frozen=True)
class Entry:
  """One labelled video of a dataset of files.

  Attributes:
    path: the video file.
    label: its class index; for a multi-label dataset, its class indices
      (sorted, none or several).
    start: the video's first frame within the file.
    end: the frame after its last; None for the end of the file.
  """
  path: str
  label: int | tuple[int, ...]
  start: int = 0
  end: int | None = None


class FileSource:
  """Labelled video files as a random-access `clip_lib.Source`.

  Attributes:
    entries: the videos.
    num_classes: for a multi-label dataset, its class count (labels are
      multi-hot); None for one class per video (labels are indices).
    multi_label: whether `num_classes` is set.
  """

  def __init__(self, entries: Sequence[Entry],
               num_classes: int | None = None):
    self.entries = list(entries)
    self.num_classes = num_classes
    self.multi_label = num_classes is not None

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int
                  ) -> tuple[video_io.VideoFile, int | np.ndarray]:
    entry = self.entries[index]
    return (video_io.VideoFile(entry.path, entry.start, entry.end),
            self._label(entry))

  def _label(self, entry: Entry) -> int | np.ndarray:
    if self.multi_label:
      return listing.multi_hot(entry.label, self.num_classes)
    return entry.label

  @property
  def labels(self) -> np.ndarray:
    """int64 `[len(self)]`; multi-label: uint8 multi-hot
    `[len(self), num_classes]`."""
    if self.multi_label:
      return np.asarray([self._label(e) for e in self.entries],
                        np.uint8).reshape(len(self), self.num_classes)
    return np.asarray([e.label for e in self.entries], np.int64)
