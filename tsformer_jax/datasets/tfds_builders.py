"""Datasets as TFDS: encoded frames in ArrayRecord, read by random access.

Decoding a compressed video to reach a few frames costs far more than reading
frames stored as images, so `prepare` writes `config.data.dataset` once as
TFDS (`synthetic_motion` as PNG; other datasets as JPEG, shrunk and
subsampled) and `tfds_source.load` reads it back as a `clip_lib.Source`.

Layout (version 2): one record per frame (`image`, `video`, `frame`), the
frames of a video consecutive, so that a clip reads only the frames it
uses; each split's videos (label, fps, frame count, first record, frame
size, source path) are listed in the dataset's metadata. Version 1 held one
record per video, all its frames in it; data prepared so is refused with
the command that prepares it again. Examples keep the split's order; videos
that fail to decode are left out, and the metadata records them per split.
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

from tsformer_jax import clip_lib
from tsformer_jax import crops
from tsformer_jax import video_io
from tsformer_jax.datasets import registry
from tsformer_jax.datasets import synthetic_motion

DATA_VERSION = '2.0.0'
# Earlier layouts, refused with the command that prepares the data again.
OLD_VERSIONS = ('1.0.0',)
SYNTHETIC = 'synthetic_motion'
SYNTHETIC_FPS = 30.0  # As `synthetic_motion.Source`.
FILE_FORMAT = 'array_record'
# `prepare`'s defaults: 15 fps at JPEG quality 75 keeps a dataset of
# Kinetics-like mp4s within 8x their size on disk (experiments/results/
# input_cpu.md); the paper's sampling rates (2 and up at 30 fps) lose no
# frame they use. The short side is at least the largest training scale
# (`default_short_side`).
DEFAULT_SHORT_SIDE = 320
# The original's Kinetics copies: its `DATASET.md` resizes every video to a
# short side of 256 first, which training enlarges to 256-320
# (`prepare --short_side=256`).
ORIGINAL_SHORT_SIDE = 256
DEFAULT_FPS = 15.0
DEFAULT_JPEG_QUALITY = 75


def default_tfds_dir() -> str:
  """`$XDG_CACHE_HOME/tsformer_jax/tfds` (else under `~/.cache`): the
  `tfds_dir` used when `config.data.tfds_dir` is empty."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'tsformer_jax', 'tfds')


def tfds_dir(config) -> str:
  """`config.data.tfds_dir`, else `default_tfds_dir()`."""
  return os.path.expanduser(config.data.tfds_dir or default_tfds_dir())


def builder_dir(config, root: str | None = None,
                version: str = DATA_VERSION) -> str:
  """The version folder of the prepared `config.data.dataset` under the TFDS
  folder `root` (None for `tfds_dir(config)`)."""
  name = registry.get_dataset(config.data.dataset).name
  root = tfds_dir(config) if root is None else root
  if name == SYNTHETIC:
    return os.path.join(root, SyntheticMotion.name, version)
  return os.path.join(root, EncodedVideos.name, name, version)


def default_short_side(config) -> int:
  """`DEFAULT_SHORT_SIDE`, or the config's largest training scale where
  larger (HR: 512), so that training never enlarges the stored frames."""
  return max(DEFAULT_SHORT_SIDE, *config.data.train_scales)


def splits_of(config) -> tuple[str, ...]:
  """The splits a job reads: the train split, then the eval split."""
  return tuple(dict.fromkeys((config.data.train_split,
                              config.data.eval_split)))


def prepare_command(config, splits: Sequence[str] | None = None) -> str:
  """The shell command that prepares `config.data.dataset` where `load`
  looks."""
  name = registry.get_dataset(config.data.dataset).name
  arg = ','.join(p for p in (config.variant, name) if p)
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


def decode_image(data: bytes, min_size: tuple[int, int] | None = None
                 ) -> np.ndarray:
  """PNG or JPEG bytes -> uint8 `[H, W, 3]`.

  Args:
    min_size: `(height, width)`: a JPEG decodes at the smallest of its
      reduced scales (1/2, 1/4, 1/8) that is at least this large (PIL's
      `draft`), which costs a fraction of the full decode.
  """
  with PIL.Image.open(io.BytesIO(data)) as image:
    if min_size is not None and image.format == 'JPEG':
      image.draft('RGB', (min_size[1], min_size[0]))
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
  return crops.resize_short_side(frame[None], short_side)[0]


def iter_frames(video: clip_lib.Video, indices: Sequence[int]
                ) -> Iterator[np.ndarray]:
  """The frames at ascending `indices`, one at a time: uint8 `[H, W, 3]`.

  As `video.frames(indices)`, but a `video_io.VideoFile` is decoded in
  one pass, never holding the whole full-size video in memory.
  """
  if not isinstance(video, video_io.VideoFile):
    yield from video.frames(np.asarray(indices, np.int64))
    return
  for _, frame in video.iter_frames(list(indices)):
    yield frame


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


def _dataset_info(builder, description: str, image: tfds.features.Image,
                  class_names: Sequence[str], metadata: dict
                  ) -> tfds.core.DatasetInfo:
  """Records of one frame each: `image`, its `video` (position in the
  split) and `frame` (index in the video); `metadata` plus `splits`, filled
  in as each split is written, and the class names."""
  return tfds.core.DatasetInfo(
      builder=builder, description=description,
      features=tfds.features.FeaturesDict(dict(
          image=image, video=tfds.features.Scalar(np.int64),
          frame=tfds.features.Scalar(np.int64))),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(metadata, splits={},
                                      class_names=list(class_names)))


class _VideoList:
  """The videos of a split as they are written: per-video lists for the
  metadata, and the running record number."""

  def __init__(self):
    self.records = 0
    self.count = 0
    self.videos = collections.defaultdict(list)

  def add(self, frames: Sequence[bytes], video: int, **fields
          ) -> Iterator[tuple[int, dict]]:
    """The frames' records, `(key, example)`; the video's `fields` (label,
    fps, ...) join the list."""
    height, width = decode_image(frames[0]).shape[:2]
    fields.update(first=self.records, num_frames=len(frames),
                  height=height, width=width)
    for key, value in fields.items():
      self.videos[key].append(value)
    self.count += 1
    for k, frame in enumerate(frames):
      yield self.records, dict(image=frame, video=video, frame=k)
      self.records += 1


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

  Video `i` of a split is `synthetic_motion.generate(split, i)`, with
  `id` '{split}/{i:05d}' and fps 30.
  """
  name = SYNTHETIC
  VERSION = tfds.core.Version(DATA_VERSION)
  RELEASE_NOTES = {
      '1.0.0': 'Generated clips of 16 frames of 32 x 32.',
      DATA_VERSION: 'One record per frame; the videos in the metadata.'}

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
        tfds.features.Image(shape=(spec.size, spec.size, 3),
                            encoding_format='png'),
        synthetic_motion.CLASSES, dict(limit=self._limit))

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
      return [encode_png(f) for f in frames], label

    videos = _VideoList()
    for index, (frames, label) in enumerate(
        ordered_map(example, range(count), self._num_workers)):
      yield from videos.add(frames, index, label=label, fps=SYNTHETIC_FPS,
                            id=f'{split}/{index:05d}')
    self.info.metadata['splits'][split] = dict(
        skipped=0, errors=[], max_label=len(synthetic_motion.CLASSES) - 1,
        videos=dict(videos.videos))


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
    multi_label: whether a video has several classes: its `label` in the
      metadata is then the list of them (`stored_label`).
  """
  short_side: int = DEFAULT_SHORT_SIDE
  fps: float = DEFAULT_FPS
  jpeg_quality: int = DEFAULT_JPEG_QUALITY
  limit: int | None = None
  data_dir: str = ''
  multi_label: bool = False

  def params(self) -> dict:
    params = dict(short_side=self.short_side, fps=self.fps,
                  jpeg_quality=self.jpeg_quality, limit=self.limit)
    # Written only where set: data prepared before them reads the same.
    return (params | (dict(data_dir=self.data_dir) if self.data_dir else {})
            | (dict(multi_label=True) if self.multi_label else {}))


class EncodedVideos(_LocalBuilder, skip_registration=True):
  """Any video dataset as TFDS: JPEG frames, one record each; the videos'
  labels, frame rates and source paths in the metadata. The `VideoConfig`
  names the dataset, `sources` gives its splits."""
  name = 'encoded_videos'
  VERSION = tfds.core.Version(DATA_VERSION)
  RELEASE_NOTES = {
      '1.0.0': 'JPEG frames, label, fps, path, index.',
      DATA_VERSION: 'One record per frame; the videos in the metadata.'}

  def __init__(self, *, config: VideoConfig,
               sources: Mapping[str, clip_lib.Source],
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
        tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        self._class_names, config.params())

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

    errors, max_label, source_bytes = [], -1, 0
    videos = _VideoList()
    for index, value in enumerate(
        ordered_map(example, range(count), self._num_workers)):
      if isinstance(value, Exception):
        logging.warning('Skipping video %d of %s: %s', index, split, value)
        errors.append(f'{index}: {value}')
        continue
      max_label = max([max_label, *np.atleast_1d(value['label']).tolist()])
      source_bytes += value['bytes']
      yield from videos.add(value['frames'], videos.count,
                            label=value['label'], fps=value['fps'],
                            path=value['path'], index=index)
    if count and len(errors) == count:
      raise clip_lib.BadVideoError(
          f'Every video of split {split!r} failed, e.g. {errors[0]}')
    if errors:
      logging.warning('%d of %d videos of %s skipped.', len(errors), count,
                      split)
    self.info.metadata['splits'][split] = dict(
        skipped=len(errors), errors=errors, max_label=max_label,
        source_bytes=source_bytes, videos=dict(videos.videos))


def encode_video(source: clip_lib.Source, index: int,
                 config: VideoConfig) -> dict:
  """Video `index` of `source`, encoded: its `frames` (JPEG bytes),
  `label`, `fps`, `path` and the `bytes` of its file.

  Raises:
    clip_lib.BadVideoError: it cannot be decoded or has no frames.
  """
  video, label = source[index]
  label = stored_label(label)
  if video.num_frames < 1:
    raise clip_lib.BadVideoError(f'video {index}: no frames.')
  indices, fps = subsample(video.num_frames, video.fps, config.fps)
  frames = [encode_jpeg(shrink(frame, config.short_side),
                        config.jpeg_quality)
            for frame in iter_frames(video, indices)]
  path = getattr(video, 'path', '')
  return dict(frames=frames, label=label, fps=fps, path=path,
              bytes=os.path.getsize(path) if path else 0)


def stored_label(label: int | np.ndarray) -> int | list[int]:
  """A label as the metadata stores it: a class index, or for multi-hot
  `[C]` the list of its classes (JSON, and short)."""
  if isinstance(label, np.ndarray) and label.ndim:
    return np.flatnonzero(label).tolist()
  return int(label)


def prepare(config, out_dir: str | None = None, *,
            splits: Sequence[str] | None = None,
            short_side: int | None = None, fps: float = DEFAULT_FPS,
            jpeg_quality: int = DEFAULT_JPEG_QUALITY,
            limit: int | None = None, num_workers: int = 4) -> str:
  """Writes `config.data.dataset` as a TFDS dataset; returns its folder.

  `synthetic_motion` is generated as PNG (`short_side`, `fps` and
  `jpeg_quality` do not apply); others are read from `config.data.data_dir`
  as JPEG. A dataset already prepared the same way is left as it is. The
  size on disk against the source videos' is logged (`size_on_disk`).

  Args:
    out_dir: the TFDS folder; None for `tfds_dir(config)`.
    splits: the splits to write; None for the train and eval splits.
    short_side: frames are shrunk to this short side where larger; 0 keeps
      their size; None for `default_short_side(config)`.
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
  if short_side is None:
    short_side = default_short_side(config)
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
            registry.data_dir(config)), multi_label=any(
                getattr(s, 'multi_label', False) for s in sources.values()))
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
  size = size_on_disk(directory)
  if size['source_bytes']:
    logging.info('%s: %.1f MB on disk, %.1fx the %.1f MB of its videos.',
                 directory, size['prepared_bytes'] / 1e6, size['ratio'],
                 size['source_bytes'] / 1e6)
  return directory


def size_on_disk(directory: str) -> dict[str, float]:
  """`prepared_bytes` (the dataset's files), `source_bytes` (the video
  files it was prepared from) and their `ratio` (0 without sources)."""
  prepared = sum(entry.stat().st_size for entry in os.scandir(directory)
                 if entry.is_file())
  info = tfds.builder_from_directory(directory).info
  source = sum(split.get('source_bytes', 0)
               for split in info.metadata.get('splits', {}).values())
  return dict(prepared_bytes=prepared, source_bytes=source,
              ratio=prepared / source if source else 0.0)


def _check_prepared(directory: str, params: dict, splits: Sequence[str]):
  info = tfds.builder_from_directory(directory).info
  old = {k: info.metadata.get(k) for k in params}
  missing = [s for s in splits if s not in info.splits]
  if old != params or missing:
    raise ValueError(
        f'{directory} already holds this dataset, prepared with {old} and '
        f'splits {sorted(info.splits)}; asked for {params} and {list(splits)}'
        '. Delete the folder or prepare into another --out.')
