"""Datasets as TFDS: encoded frames in ArrayRecord, read by random access.

Decoding a compressed video to reach a few frames costs far more than reading
frames stored as images, so `prepare` writes `config.data.dataset` once as
TFDS (`synthetic_motion` as PNG; other datasets as JPEG, shrunk and
subsampled) and `load` reads it back as an `input_pipeline.Source`. Examples
keep the split's order; videos that fail to decode are left out, and the
metadata records them per split.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import concurrent.futures
import dataclasses
import io
import logging
import os
import shlex
import tempfile

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from tsformer_jax import input_pipeline
from tsformer_jax.datasets import registry
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_files

DATA_VERSION = '1.0.0'
SYNTHETIC = 'synthetic_motion'
SYNTHETIC_FPS = 30.0  # As `synthetic_motion.Source`.
FILE_FORMAT = 'array_record'


def default_tfds_dir() -> str:
  """`$XDG_CACHE_HOME/tsformer_jax/tfds` (else under `~/.cache`): the
  `tfds_dir` used when `config.data.tfds_dir` is empty."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'tsformer_jax', 'tfds')


def tfds_dir(config) -> str:
  """`config.data.tfds_dir`, else `default_tfds_dir()`."""
  return os.path.expanduser(config.data.get('tfds_dir', '') or
                            default_tfds_dir())


def builder_dir(config, root: str | None = None) -> str:
  """The version folder of the prepared `config.data.dataset` under the TFDS
  folder `root` (None for `tfds_dir(config)`)."""
  name = registry.get_dataset(config.data.dataset).name
  root = tfds_dir(config) if root is None else root
  if name == SYNTHETIC:
    return os.path.join(root, SyntheticMotion.name, DATA_VERSION)
  return os.path.join(root, EncodedVideos.name, name, DATA_VERSION)


def splits_of(config) -> tuple[str, ...]:
  """The splits a job reads: the train split, then the eval split."""
  return tuple(dict.fromkeys((config.data.train_split,
                              config.data.eval_split)))


def prepare_command(config, splits: Sequence[str] | None = None) -> str:
  """The shell command that prepares `config.data.dataset` where `load`
  looks."""
  name = registry.get_dataset(config.data.dataset).name
  arg = ','.join(p for p in (config.get('variant', ''), name) if p)
  words = ['python', '-m', 'tsformer_jax.datasets.prepare',
           f'--config=configs/{config.model.attention}.py:{arg}',
           f'--out={tfds_dir(config)}']
  if config.data.data_dir:
    words.append(f'--config.data.data_dir={config.data.data_dir}')
  if splits is not None and tuple(splits) != splits_of(config):
    words.append(f'--splits={",".join(splits)}')
  return ' '.join(shlex.quote(w) for w in words)


def encode_png(frame: np.ndarray) -> bytes:
  """uint8 `[H, W, 3]` -> PNG bytes (lossless)."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(frame).save(buffer, format='PNG')
  return buffer.getvalue()


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
  """uint8 `[H, W, 3]` -> JPEG bytes at `quality` (1 to 95)."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(frame).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """PNG or JPEG bytes -> uint8 `[H, W, 3]`."""
  with PIL.Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert('RGB'))


def subsample(num_frames: int, fps: float, max_fps: float
              ) -> tuple[np.ndarray, float]:
  """(Ascending frame indices `[K]`, their rate): the frames kept to play at
  most `max_fps` (0 keeps every frame)."""
  if not max_fps or fps <= max_fps:
    return np.arange(num_frames), fps
  count = int(np.ceil(num_frames * max_fps / fps - 1e-9))
  # The epsilon keeps exact ratios (30 -> 15 fps: 0, 2, 4) from rounding down.
  indices = np.floor(np.arange(count) * fps / max_fps + 1e-6).astype(int)
  return np.minimum(indices, num_frames - 1), max_fps


def shrink(frame: np.ndarray, short_side: int) -> np.ndarray:
  """Resizes `[H, W, 3]` so that min(H, W) <= short_side; never enlarges."""
  if not short_side or min(frame.shape[:2]) <= short_side:
    return frame
  return input_pipeline.resize_short_side(frame[None], short_side)[0]


def iter_frames(video: input_pipeline.Video, indices: np.ndarray
                ) -> Iterator[np.ndarray]:
  """The frames at ascending `indices`, one at a time: uint8 `[H, W, 3]`.

  As `video.frames(indices)`, but a `video_files.VideoFile` is decoded in
  one pass, never holding the whole full-size video in memory.
  """
  if not isinstance(video, video_files.VideoFile):
    yield from video.frames(indices)
    return
  indices = np.asarray(indices, np.int64)
  if video.end is not None:
    indices = np.minimum(indices, video.end - video.start - 1)
  yield from _decode_ascending(video.path, (indices + video.start).tolist())


def _decode_ascending(path: str, wanted: list[int]) -> Iterator[np.ndarray]:
  """`video_files.decode(path, wanted)` for ascending `wanted`, streamed:
  indices past the last decodable frame give that frame."""
  if not wanted:
    return
  position = 0
  for i, frame in video_files.decoded_frames(path):
    last = frame
    if wanted[position] == i:
      rgb = frame.to_ndarray(format='rgb24')
      while position < len(wanted) and wanted[position] == i:
        yield rgb
        position += 1
      if position == len(wanted):
        return
  rgb = last.to_ndarray(format='rgb24')
  for _ in wanted[position:]:
    yield rgb


def ordered_map(fn: Callable, items: Iterable, num_workers: int
                ) -> Iterator:
  """`map(fn, items)` on `num_workers` threads, results in order; at most
  `2 * num_workers` wait at a time, so memory stays bounded."""
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * num_workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class _KeepEncoded(tfds.decode.Decoder):
  """Leaves a video's frames as encoded bytes, so that a clip decodes only
  the frames it takes."""

  def decode_example(self, serialized_example):
    return serialized_example

  def decode_example_np(self, serialized_example):
    return serialized_example

  def decode_batch_example_np(self, serialized_example):
    return serialized_example


def _dataset_info(builder, description: str, video: tfds.features.Video,
                  class_names: Sequence[str], metadata: dict,
                  extra: dict) -> tfds.core.DatasetInfo:
  """Features `video`, `label`, `fps` and `extra`, kept in their order;
  `metadata` plus `splits`, filled in as each split is written."""
  return tfds.core.DatasetInfo(
      builder=builder, description=description,
      features=tfds.features.FeaturesDict(dict(
          video=video, label=tfds.features.ClassLabel(names=class_names),
          fps=tfds.features.Scalar(np.float32), **extra)),
      supervised_keys=('video', 'label'), disable_shuffling=True,
      metadata=tfds.core.MetadataDict(metadata, splits={}))


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder that downloads nothing; unregistered, as data is read back
  with `tfds.builder_from_directory`."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # No downloads, so no checksum lookup (it needs `importlib_resources`).
    return None


class SyntheticMotion(_LocalBuilder, skip_registration=True):
  """`synthetic_motion` as TFDS: PNG frames, so exactly the generated ones.

  Example `i` of a split is `synthetic_motion.generate(split, i)`, with
  `id` '{split}/{i:05d}' and fps 30.
  """
  name = SYNTHETIC
  VERSION = tfds.core.Version(DATA_VERSION)
  RELEASE_NOTES = {DATA_VERSION: 'Generated clips of 16 frames of 32 x 32.'}

  def __init__(self, *, limit: int | None = None, num_workers: int = 2,
               **kwargs):
    """
    Args:
      limit: videos per split at most (a quick trial); None for all.
      num_workers: threads generating and encoding clips.
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (`data_dir`, ...).
    """
    self._limit, self._num_workers = limit, num_workers
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    spec = synthetic_motion.Spec()
    return _dataset_info(
        self, synthetic_motion.__doc__,
        tfds.features.Video((spec.num_frames, spec.size, spec.size, 3),
                            encoding_format='png'),
        synthetic_motion.CLASSES, dict(limit=self._limit),
        dict(id=tfds.features.Text()))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split)
            for split in synthetic_motion.SPLITS}

  def _generate_examples(self, split: str):
    count = synthetic_motion.num_examples(split)
    if self._limit is not None:
      count = min(count, self._limit)

    def example(index):
      frames, label = synthetic_motion.generate(split, index)
      return dict(video=[encode_png(f) for f in frames], label=label,
                  fps=SYNTHETIC_FPS, id=f'{split}/{index:05d}')

    yield from enumerate(
        ordered_map(example, range(count), self._num_workers))
    self.info.metadata['splits'][split] = dict(
        skipped=0, errors=[], max_label=len(synthetic_motion.CLASSES) - 1)


@dataclasses.dataclass(eq=False)
class VideoConfig(tfds.core.BuilderConfig):
  """How `EncodedVideos` stores a dataset; `name` is its `DATASETS` key.

  Attributes:
    short_side: frames are shrunk to this short side (aspect kept) where
      larger; 0 keeps their size.
    fps: frames are subsampled to this rate where faster; 0 keeps them
      all.
    jpeg_quality: JPEG quality of the stored frames (1 to 95).
    limit: videos per split at most (a quick trial); None for all.
    data_dir: for a dataset that its folder alone names (`folder`), that
      folder, so that another is not taken for it; else ''.
  """
  short_side: int = 320
  fps: float = 0.0
  jpeg_quality: int = 90
  limit: int | None = None
  data_dir: str = ''

  def params(self) -> dict:
    params = dict(short_side=self.short_side, fps=self.fps,
                  jpeg_quality=self.jpeg_quality, limit=self.limit)
    return params | (dict(data_dir=self.data_dir) if self.data_dir else {})


class EncodedVideos(_LocalBuilder, skip_registration=True):
  """Any video dataset as TFDS: JPEG frames, label, fps, source path; the
  `VideoConfig` names the dataset, `sources` gives its splits."""
  name = 'encoded_videos'
  VERSION = tfds.core.Version(DATA_VERSION)
  RELEASE_NOTES = {DATA_VERSION: 'JPEG frames, label, fps, path, index.'}

  def __init__(self, *, config: VideoConfig,
               sources: Mapping[str, input_pipeline.Source],
               class_names: Sequence[str], num_workers: int = 4, **kwargs):
    """
    Args:
      config: the dataset and how its frames are stored.
      sources: split name -> its videos (`registry.file_source`).
      class_names: the dataset's class names, by index.
      num_workers: threads decoding and encoding videos.
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (`data_dir`, ...).
    """
    self._sources, self._class_names = dict(sources), list(class_names)
    self._num_workers = num_workers
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return _dataset_info(
        self, f'{config.name}: {config.description}',
        tfds.features.Video((None, None, None, 3), encoding_format='jpeg'),
        self._class_names, config.params(),
        dict(path=tfds.features.Text(), index=tfds.features.Scalar(np.int64)))

  def _split_generators(self, dl_manager):
    del dl_manager  # The videos are read where they lie.
    return {split: self._generate_examples(split) for split in self._sources}

  def _generate_examples(self, split: str):
    source, config = self._sources[split], self.builder_config
    count = len(source)
    if config.limit is not None:
      count = min(count, config.limit)

    def example(index):
      try:
        return encode_video(source, index, config)
      except Exception as e:  # pylint: disable=broad-except
        # One bad file must not end hours of conversion.
        return e

    errors, max_label = [], -1
    for index, value in enumerate(
        ordered_map(example, range(count), self._num_workers)):
      if isinstance(value, Exception):
        logging.warning('Skipping video %d of %s: %s', index, split, value)
        errors.append(f'{index}: {value}')
        continue
      max_label = max(max_label, value['label'])
      yield index, value
    if count and len(errors) == count:
      raise input_pipeline.BadVideoError(
          f'Every video of split {split!r} failed, e.g. {errors[0]}')
    if errors:
      logging.warning('%d of %d videos of %s skipped.', len(errors), count,
                      split)
    self.info.metadata['splits'][split] = dict(
        skipped=len(errors), errors=errors, max_label=max_label)


def encode_video(source: input_pipeline.Source, index: int,
                 config: VideoConfig) -> dict:
  """Video `index` of `source` as an `EncodedVideos` example.

  Raises:
    input_pipeline.BadVideoError: it cannot be decoded or has no frames.
  """
  video, label = source[index]
  if video.num_frames < 1:
    raise input_pipeline.BadVideoError(f'video {index}: no frames.')
  indices, fps = subsample(video.num_frames, video.fps, config.fps)
  frames = [encode_jpeg(shrink(frame, config.short_side),
                        config.jpeg_quality)
            for frame in iter_frames(video, indices)]
  return dict(video=frames, label=label, fps=fps,
              path=getattr(video, 'path', ''), index=index)


def prepare(config, out_dir: str | None = None, *,
            splits: Sequence[str] | None = None, short_side: int = 320,
            fps: float = 0.0, jpeg_quality: int = 90,
            limit: int | None = None, num_workers: int = 4) -> str:
  """Writes `config.data.dataset` as a TFDS dataset; returns its folder.

  `synthetic_motion` is generated as PNG (`short_side`, `fps` and
  `jpeg_quality` do not apply); others are read from `config.data.data_dir`
  as JPEG. A dataset already prepared the same way is left as it is.

  Args:
    out_dir: the TFDS folder; None for `tfds_dir(config)`.
    splits: the splits to write; None for the train and eval splits.
    short_side: frames are shrunk to this short side where larger; 0 keeps
      their size.
    fps: frames are subsampled to this rate where faster; 0 keeps all.
    jpeg_quality: JPEG quality (1 to 95).
    limit: videos per split at most (a quick trial); None for all.
    num_workers: threads decoding and encoding.

  Raises:
    FileNotFoundError: the dataset's files are missing (what is expected,
      where).
    ValueError: the folder holds the dataset prepared otherwise.
  """
  dataset = registry.get_dataset(config.data.dataset)
  name = dataset.name
  root = tfds_dir(config) if out_dir is None else os.path.expanduser(out_dir)
  splits = splits_of(config) if splits is None else tuple(splits)
  if not 1 <= jpeg_quality <= 95:
    raise ValueError(f'jpeg_quality must be in [1, 95], got {jpeg_quality}.')
  if name == SYNTHETIC:
    unknown = set(splits) - set(synthetic_motion.SPLITS)
    if unknown:
      raise ValueError(f'Unknown splits {sorted(unknown)} of {name}; valid: '
                       f'{sorted(synthetic_motion.SPLITS)}.')
    builder = SyntheticMotion(limit=limit, num_workers=num_workers,
                              data_dir=root, file_format=FILE_FORMAT)
    params, splits = dict(limit=limit), tuple(synthetic_motion.SPLITS)
  else:
    # Opened first: a missing dataset fails here, naming what it expects.
    class_names = registry.class_names(config)
    # No model reads them here: the labels must fit the names.
    sources = {s: registry.file_source(config, s, len(class_names))
               for s in splits}
    video_config = VideoConfig(
        name=name, description=(
            f'short side <= {short_side or "any"}, fps <= {fps or "any"}, '
            f'JPEG quality {jpeg_quality}'),
        short_side=short_side, fps=fps, jpeg_quality=jpeg_quality,
        limit=limit, data_dir='' if dataset.num_classes else os.path.abspath(
            registry.data_dir(config)))
    builder = EncodedVideos(
        config=video_config, sources=sources,
        class_names=class_names, num_workers=num_workers,
        data_dir=root, file_format=FILE_FORMAT)
    params = video_config.params()
  directory = os.fspath(builder.data_dir)
  if os.path.exists(os.path.join(directory, 'dataset_info.json')):
    _check_prepared(directory, params, splits)
    logging.info('%s is already prepared in %s.', name, directory)
    return directory
  with tempfile.TemporaryDirectory() as downloads:  # Nothing to download.
    builder.download_and_prepare(download_dir=downloads,
                                 file_format=FILE_FORMAT)
  return directory


def _check_prepared(directory: str, params: dict, splits: Sequence[str]):
  info = tfds.builder_from_directory(directory).info
  old = {k: info.metadata.get(k) for k in params}
  missing = [s for s in splits if s not in info.splits]
  if old != params or missing:
    raise ValueError(
        f'{directory} already holds this dataset, prepared with {old} and '
        f'splits {sorted(info.splits)}; asked for {params} and {list(splits)}'
        '. Delete the folder or prepare into another --out.')


def load(config, split: str) -> TfdsSource:
  """`split` of the prepared `config.data.dataset` (`config.data.format` is
  'tfds').

  Raises:
    FileNotFoundError: it has not been prepared, or not that split; the
      message gives the command that prepares it.
    ValueError: it has labels beyond `config.model.num_classes`.
  """
  directory = builder_dir(config)
  if not os.path.exists(os.path.join(directory, 'dataset_info.json')):
    raise FileNotFoundError(
        f'config.data.format is "tfds" but {directory!r} holds no '
        f'prepared {config.data.dataset} (no dataset_info.json); tfds_dir is '
        f'{tfds_dir(config)!r}. Prepare it with:\n  '
        f'{prepare_command(config)}')
  source = TfdsSource(directory, split, lambda splits: prepare_command(
      config, splits))
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
  """A split of a prepared TFDS dataset as an `input_pipeline.Source`.

  `source[i]` is `(video, label)`; frames decode when a clip asks for them.

  Attributes:
    directory: the dataset's version folder.
    class_names: the dataset's class names, by index.
    split_metadata: what `prepare` recorded of the split: `skipped` (the
      videos left out), `errors` and `max_label`.
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
    self.class_names = list(builder.info.features['label'].names)
    self.split_metadata = dict(
        builder.info.metadata.get('splits', {}).get(split, {}))
    self._records = builder.as_data_source(
        split, decoders=dict(video=_KeepEncoded()))
    if self.split_metadata.get('skipped'):
      logging.info('%s %s: %d videos were skipped when it was prepared.',
                   directory, split, self.split_metadata['skipped'])

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> tuple[EncodedVideo, int]:
    example = self._records[index]
    return (EncodedVideo(tuple(example['video']), float(example['fps'])),
            int(example['label']))


@dataclasses.dataclass(frozen=True)
class EncodedVideo:
  """A video of encoded frames (PNG or JPEG bytes), decoded on demand."""
  encoded: tuple[bytes, ...]
  fps: float

  @property
  def num_frames(self) -> int:
    return len(self.encoded)

  def frames(self, indices: np.ndarray) -> np.ndarray:
    """uint8 `[len(indices), H, W, 3]`; each distinct frame decoded once."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if not indices.size:
      return decode_image(self.encoded[0])[None][:0]
    decoded = {i: decode_image(self.encoded[i])
               for i in dict.fromkeys(indices.tolist())}
    return np.stack([decoded[i] for i in indices.tolist()])
