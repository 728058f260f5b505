"""Reading a prepared TFDS dataset back: a split as a `clip_lib.Source`.

`tfds_builders.prepare` writes the dataset, one record per frame; `load`
opens a split from its metadata alone, and a clip reads and decodes only the
records of the frames it uses, by random access.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import functools
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from tsformer_jax.datasets import registry
from tsformer_jax.datasets import tfds_builders


def load(config, split: str) -> TfdsSource:
  """`split` of the prepared `config.data.dataset` (`config.data.format` is
  'tfds').

  Raises:
    FileNotFoundError: it has not been prepared, not that split, or only in
      an old layout; the message gives the command that prepares it.
    ValueError: it has labels beyond `config.model.num_classes`.
  """
  directory = tfds_builders.builder_dir(config)
  command = functools.partial(tfds_builders.prepare_command, config)
  if not os.path.exists(os.path.join(directory, 'dataset_info.json')):
    old = [v for v in tfds_builders.OLD_VERSIONS if os.path.exists(
        os.path.join(tfds_builders.builder_dir(config, version=v),
                     'dataset_info.json'))]
    if old:
      raise FileNotFoundError(
          f'{tfds_builders.builder_dir(config, version=old[-1])!r} holds '
          f'{config.data.dataset} prepared in the old layout {old[-1]} (one '
          'record per video); this version reads layout '
          f'{tfds_builders.DATA_VERSION} (one record per frame, so that a '
          f'clip reads only its frames) from {directory!r}. Prepare it again '
          f'with:\n  {command()}')
    raise FileNotFoundError(
        f'config.data.format is "tfds" but {directory!r} holds no '
        f'prepared {config.data.dataset} (no dataset_info.json); tfds_dir is '
        f'{tfds_builders.tfds_dir(config)!r}. Prepare it with:\n  '
        f'{command()}')
  source = TfdsSource(directory, split, command)
  stored = source.short_side
  if stored and stored < min(config.data.train_scales):
    logging.warning(
        '%s was prepared with frames of short side %d at most, below this '
        "config's training scales %s: its frames are enlarged. Prepare it "
        'again with --short_side=%d, into another --out.', directory, stored,
        tuple(config.data.train_scales),
        tfds_builders.default_short_side(config))
  top = source.split_metadata.get('max_label', -1)
  num_classes = config.model.num_classes
  if not registry.get_dataset(config.data.dataset).num_classes:
    registry.check_class_count(len(source.class_names), num_classes,
                               f'The prepared {directory!r}')
  if num_classes and top >= num_classes:
    raise ValueError(
        f'{directory} split {split} has class {top}, but '
        f'config.model.num_classes is {num_classes}: select the dataset with '
        'the config arg (e.g. configs/divided.py:base,'
        f'{config.data.dataset}) or set --config.model.num_classes.')
  return source


class TfdsSource:
  """A split of a prepared TFDS dataset as a `clip_lib.Source`.

  `source[i]` is `(video, label)` from the metadata alone; a clip then reads
  and decodes the records of the frames it uses. Pickles as its folder and
  split (a worker process opens it again).

  Attributes:
    directory: the dataset's version folder.
    split: the split.
    class_names: the dataset's class names, by index.
    short_side: `prepare`'s short side (0: frames kept whole; None for
      generated data).
    multi_label: whether videos have several classes (labels multi-hot
      `[num_classes]`, from the class lists stored); else class indices.
    num_classes: the count of class names.
    split_metadata: what `prepare` recorded of the split: `skipped` (the
      videos left out), `errors`, `max_label` and `videos` (per-video
      lists: `label`, `fps`, `num_frames`, `first` record, `height`,
      `width`, and `path` or `id`).
  """

  def __init__(self, directory: str, split: str,
               command: Callable[[list[str]], str] | None = None):
    """
    Args:
      directory: the version folder (`builder_dir`).
      command: splits -> the command preparing them, for the error on a
        split that is not there.
    """
    builder = tfds.builder_from_directory(directory)
    if split not in builder.info.splits:
      # TFDS cannot add a split to a prepared dataset: all again.
      splits = sorted(set(builder.info.splits) | {split})
      hint = (f' Delete {directory} and prepare the splits needed with:\n  '
              f'{command(splits)}' if command else '')
      raise FileNotFoundError(
          f'{directory} holds splits {sorted(builder.info.splits)}, not '
          f'{split!r}.{hint}')
    self.directory, self.split = directory, split
    self.class_names = list(builder.info.metadata['class_names'])
    self.short_side = builder.info.metadata.get('short_side')
    self.multi_label = bool(builder.info.metadata.get('multi_label'))
    self.num_classes = len(self.class_names)
    self.split_metadata = dict(
        builder.info.metadata.get('splits', {}).get(split, {}))
    videos = self.split_metadata.get('videos', {})
    self._labels = _labels(videos.get('label', []), self.multi_label,
                           self.num_classes)
    self._fps = np.asarray(videos.get('fps', []), np.float64)
    self._first = np.asarray(videos.get('first', []), np.int64)
    self._num_frames = np.asarray(videos.get('num_frames', []), np.int64)
    self._sizes = np.stack([videos.get('height', []),
                            videos.get('width', [])], -1).astype(np.int64)
    self._records = builder.as_data_source(
        split, decoders=dict(image=_KeepEncoded()))
    if self.split_metadata.get('skipped'):
      logging.info('%s %s: %d videos were skipped when it was prepared.',
                   directory, split, self.split_metadata['skipped'])

  def __getstate__(self) -> dict:
    return dict(directory=self.directory, split=self.split)

  def __setstate__(self, state: dict):
    self.__init__(state['directory'], state['split'])

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int
                  ) -> tuple[EncodedVideo, int | np.ndarray]:
    if not -len(self) <= index < len(self):
      raise IndexError(f'Video {index} of {len(self)}.')
    return (EncodedVideo(self._records, int(self._first[index]),
                         int(self._num_frames[index]),
                         float(self._fps[index]),
                         tuple(self._sizes[index].tolist())),
            self._labels[index].copy() if self.multi_label
            else int(self._labels[index]))

  @property
  def labels(self) -> np.ndarray:
    """int64 `[len(self)]`; multi-label: uint8 multi-hot
    `[len(self), num_classes]`."""
    return self._labels


def _labels(stored: Sequence, multi_label: bool, num_classes: int
            ) -> np.ndarray:
  """The metadata's labels (`tfds_builders.stored_label`) as int64 `[N]`,
  or multi-label as uint8 multi-hot `[N, num_classes]`."""
  if not multi_label:
    return np.asarray(stored, np.int64)
  target = np.zeros((len(stored), num_classes), np.uint8)
  for row, classes in zip(target, stored, strict=True):
    row[classes] = 1
  return target


@dataclasses.dataclass(frozen=True)
class EncodedVideo:
  """A video of encoded frames (PNG or JPEG), one record each, decoded on
  demand: a clip reads and decodes only the frames it uses.

  Attributes:
    records: the split's records (`image` bytes each).
    first: the record of frame 0.
    num_frames: frames in the video.
    fps: its frame rate.
    frame_size: `(height, width)` of its frames.
  """
  records: Sequence[dict]
  first: int
  num_frames: int
  fps: float
  frame_size: tuple[int, int]
  # JPEG frames decode at reduced scales (`frames(..., min_size)`).
  decodes_reduced = True

  def encoded(self, indices: Sequence[int]) -> list[bytes]:
    """The encoded frames at `indices`, read together."""
    keys = [self.first + int(i) for i in indices]
    return [r['image'] for r in self.records.__getitems__(keys)]

  def frames(self, indices: np.ndarray,
             min_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 `[len(indices), H, W, 3]`; each distinct frame read and
    decoded once, at a reduced scale no smaller than `min_size` where the
    format allows (JPEG)."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or
                         indices.max() >= self.num_frames):
      raise IndexError(f'Frames {indices.min()}..{indices.max()} of '
                       f'{self.num_frames}.')
    distinct = list(dict.fromkeys(indices.tolist()))
    if not distinct:
      return tfds_builders.decode_image(self.encoded([0])[0])[None][:0]
    decoded = dict(zip(distinct, (
        tfds_builders.decode_image(data, min_size)
        for data in self.encoded(distinct)), strict=True))
    return np.stack([decoded[i] for i in indices.tolist()])


class _KeepEncoded(tfds.decode.Decoder):
  """Leaves a frame as encoded bytes, so that it decodes when a clip asks
  for it, and at the scale the clip needs."""

  def decode_example(self, serialized_example):
    return serialized_example

  def decode_example_np(self, serialized_example):
    return serialized_example

  def decode_batch_example_np(self, serialized_example):
    return serialized_example
