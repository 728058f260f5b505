"""Tensor files read without torch and without running any pickled code.

Reads safetensors (through the `safetensors` library), `.npz` without
pickles, and `torch.save` files (zip or legacy).
Unpickling calls every global a pickle names, so `read_torch` allows only
plain values and torch's tensor-rebuilding functions, swapped for ours; any
other global raises `UnsafePickleError` before it is imported. Tensors are
`LazyArray`s, read on `np.asarray`, so optimizer state costs no memory.

Writes safetensors (`write_safetensors`); `torch_writer` writes
`torch.save` files.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import functools
import os
import pickle
import shutil
import struct
import tempfile
from typing import Any
import zipfile
import zlib

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle names something other than plain values and tensors."""


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """An array in a file, read when converted with `np.asarray`.

  Attributes:
    shape: the array's shape.
    dtype: its numpy dtype.
    read: returns the array; called on every conversion, nothing is cached.
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  read: Callable[[], np.ndarray] = dataclasses.field(repr=False)

  def __array__(self, dtype=None, copy=None):
    del copy  # A fresh array each time: copies are free.
    value = self.read()
    return value if dtype is None else value.astype(dtype)


def read_tensors(path: str) -> dict[str, Any]:
  """The tensors of a `.npz`, `.safetensors` or `torch.save` file by name.

  A `torch.save` file may hold any nest of dicts and lists: it is returned
  as unpickled (see `read_torch`), with `LazyArray`s for its tensors.
  """
  if path.endswith('.npz'):
    return read_npz(path)
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  return read_torch(path)


def read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of a `.npz`; never its pickles (object arrays)."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {name: npz[name] for name in npz.files}
  except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as e:
    if 'allow_pickle' in str(e):  # numpy advises unpickling: never here.
      raise ValueError(f'{path}: not a readable .npz: no zip of arrays, or '
                       'arrays of pickled objects (never loaded).') from e
    raise ValueError(f'{path}: not a readable .npz (truncated or corrupt): '
                     f'{e}.') from e


# ----------------------------------------------------------------------------
# safetensors

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'F8_E4M3': ml_dtypes.float8_e4m3fn,
    'F8_E5M2': ml_dtypes.float8_e5m2, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}


def read_safetensors(path: str) -> dict[str, LazyArray]:
  """The tensors of a safetensors file, each read when converted.

  The `safetensors` library checks the header against the file (a cut
  file fails here, not when a tensor is read) and reads bfloat16 as
  ml_dtypes' bfloat16.
  """
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      slices = {name: f.get_slice(name) for name in f.keys()}
      info = {name: (s.get_dtype(), tuple(s.get_shape()))
              for name, s in slices.items()}
  except safetensors.SafetensorError as e:
    raise ValueError(f'{path}: not a readable safetensors file (truncated '
                     f'or corrupt): {e}.') from e
  tensors = {}
  for name, (dtype, shape) in info.items():
    if dtype not in _SAFETENSORS_DTYPES:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype '
                       f'{dtype}.')
    tensors[name] = LazyArray(shape, np.dtype(_SAFETENSORS_DTYPES[dtype]),
                              functools.partial(_read_tensor, path, name))
  return tensors


def _read_tensor(path: str, name: str) -> np.ndarray:
  with safetensors.safe_open(path, framework='numpy') as f:
    return f.get_tensor(name)


# ----------------------------------------------------------------------------
# torch.save files

# torch's storage classes, as a pickle names them, and their element types.
STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8,
    'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
# The first object of a legacy (non-zip) torch.save file.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What the pickle's `torch.FloatStorage` (etc.) global becomes."""
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """One flat storage of the file: `numel` elements of `dtype`."""
  dtype: np.dtype
  numel: int
  read: Callable[[], bytes] = dataclasses.field(repr=False)
  big_endian: bool = False

  def array(self) -> np.ndarray:
    data = self.read()
    if len(data) != self.numel * self.dtype.itemsize:
      raise ValueError(f'Storage of {self.numel} x {self.dtype} holds '
                       f'{len(data)} bytes.')
    flat = np.frombuffer(data, self.dtype)
    return flat.byteswap() if self.big_endian else flat


def _rebuild_tensor(storage, offset, size, stride, *unused) -> LazyArray:
  """Our `torch._utils._rebuild_tensor(_v2)`: a strided view of a storage."""
  del unused  # requires_grad, backward hooks, metadata.
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError('A tensor without a storage.')
  shape, stride = tuple(map(int, size)), tuple(map(int, stride))
  offset = int(offset)
  if len(shape) != len(stride) or offset < 0 or any(
      n < 0 for n in shape + stride):
    raise pickle.UnpicklingError(f'Bad tensor layout: size {shape}, stride '
                                 f'{stride}, offset {offset}.')
  if 0 not in shape:
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if last >= storage.numel:
      raise pickle.UnpicklingError(
          f'Tensor of size {shape} and stride {stride} at offset {offset} '
          f'runs past its storage of {storage.numel} elements.')

  def read():
    if 0 in shape:
      return np.zeros(shape, storage.dtype)
    flat = storage.array()[offset:]
    strides = tuple(s * flat.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(flat, shape, strides).copy()

  return LazyArray(shape, storage.dtype, read)


def _rebuild_parameter(data, *unused):
  """Our `torch._utils._rebuild_parameter(_with_state)`: just the data."""
  del unused
  return data


def _latin1_encode(text, encoding='latin1'):
  """Our `_codecs.encode`, with which protocol-2 pickles write bytes."""
  if encoding not in ('latin1', 'latin-1'):
    raise UnsafePickleError(f'_codecs.encode with encoding {encoding!r}.')
  return text.encode('latin1')


_ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch', 'Size'): tuple,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('__builtin__', 'set'): set,  # Python 2 names, as protocol 2 writes.
    ('__builtin__', 'frozenset'): frozenset,
    ('_codecs', 'encode'): _latin1_encode,
}
# Storage types are made afresh for each pickle that names one (see
# `find_class`).
_STORAGE_TYPES = {('torch', name): np.dtype(dtype)
                  for name, dtype in STORAGE_DTYPES.items()}


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds plain values and tensors; refuses every other global."""

  def __init__(self, file, path: str,
               persistent_load: Callable[[Any], Any] | None = None):
    super().__init__(file)
    self._path = path
    self._load_storage = persistent_load

  def find_class(self, module: str, name: str):
    if (module, name) in _STORAGE_TYPES:
      # A new instance: a pickle's BUILD may rewrite what it gets (a frozen
      # dataclass too), and must not rewrite it for later files.
      return _StorageType(_STORAGE_TYPES[(module, name)])
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise UnsafePickleError(
        f'{self._path}: refusing to unpickle the global {module}.{name}: '
        'only tensors and plain values are read from checkpoints, nothing in '
        'them is run. If the file is yours, save its state dict alone (or '
        'use safetensors).')

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise UnsafePickleError(f'{self._path}: unexpected persistent id.')
    return self._load_storage(pid)


_ZIP_MAGIC = b'PK\x03\x04'


def read_torch(path: str) -> Any:
  """The object a `torch.save` file holds, tensors as `LazyArray`s.

  Raises:
    UnsafePickleError: the pickle names a global outside the allow-list
      (nothing is imported or called).
    ValueError: the file is not a `torch.save` file.
  """
  with open(path, 'rb') as f:
    head = f.read(4)
  if zipfile.is_zipfile(path):
    try:
      return _read_torch_zip(path)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
      raise ValueError(f'{path}: truncated or corrupt ({e}).') from e
  if head == _ZIP_MAGIC:
    raise ValueError(f'{path}: truncated or corrupt: a zip archive (the '
                     'torch.save format) whose end is missing.')
  return _read_torch_legacy(path)


def _storage_args(pid, path) -> tuple[np.dtype, str, int]:
  if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage' or
      not isinstance(pid[1], _StorageType) or
      not isinstance(pid[1].dtype, np.dtype)):  # Rewritten by BUILD.
    raise UnsafePickleError(f'{path}: unexpected persistent id {pid!r}.')
  return pid[1].dtype, str(pid[2]), int(pid[4])


def _read_torch_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    pickles = sorted(n for n in names
                     if n.endswith('data.pkl') and n.count('/') == 1)
    if not pickles:
      raise ValueError(f'{path}: a zip file without <name>/data.pkl; not a '
                       'torch.save file.')
    prefix = pickles[0][:-len('data.pkl')]
    byteorder = (archive.read(prefix + 'byteorder').decode().strip()
                 if prefix + 'byteorder' in names else 'little')

    def load_storage(pid):
      dtype, key, numel = _storage_args(pid, path)
      name = f'{prefix}data/{key}'
      if name not in names:
        raise ValueError(f'{path}: storage {name} is missing.')

      def read():
        try:
          with zipfile.ZipFile(path) as z:
            return z.read(name)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
          raise ValueError(f'{path}: truncated or corrupt ({name}: {e}).'
                           ) from e
      return _Storage(dtype, numel, read, big_endian=byteorder == 'big')

    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, path, load_storage).load()


def _read_torch_legacy(path: str) -> Any:
  """The pre-1.6 format: magic, protocol, system info, object, keys, data."""
  storages = {}

  def load_storage(pid):
    dtype, key, numel = _storage_args(pid, path)
    if len(pid) > 5 and pid[5] is not None:
      raise ValueError(f'{path}: storage views of torch < 1.0 are not '
                       'supported; re-save the file with a recent torch.')
    if key not in storages:
      storages[key] = dict(dtype=dtype, numel=numel)
    return _Storage(dtype, numel, lambda: storages[key]['read']())

  with open(path, 'rb') as f:
    try:
      magic = _RestrictedUnpickler(f, path).load()
    except UnsafePickleError:
      raise
    except Exception as e:
      raise ValueError(f'{path}: not a torch.save file ({e}).') from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f'{path}: not a torch.save file (a pickle of '
                       f'{type(magic).__name__}).')
    try:
      _RestrictedUnpickler(f, path).load()  # Protocol version.
      _RestrictedUnpickler(f, path).load()  # System info.
      obj = _RestrictedUnpickler(f, path, load_storage).load()
      keys = _RestrictedUnpickler(f, path).load()
      # Each storage: an int64 element count, then raw little-endian bytes.
      size = os.fstat(f.fileno()).st_size
      for key in keys:
        if key not in storages:
          raise ValueError(f'{path}: unknown storage {key!r}.')
        (numel,) = struct.unpack('<q', f.read(8))
        info = storages[key]
        nbytes = numel * info['dtype'].itemsize
        if f.tell() + nbytes > size:
          raise EOFError(f'storage {key} ends past the end of the file')
        info['read'] = _byte_reader(path, f.tell(), nbytes)
        f.seek(nbytes, os.SEEK_CUR)
    except (EOFError, struct.error, pickle.UnpicklingError) as e:
      if isinstance(e, UnsafePickleError):
        raise
      raise ValueError(f'{path}: truncated or corrupt ({e}).') from e
  missing = [k for k, info in storages.items() if 'read' not in info]
  if missing:
    raise ValueError(f'{path}: storages {missing} have no data.')
  return obj


def _byte_reader(path, offset, nbytes):
  def read():
    with open(path, 'rb') as f:
      f.seek(offset)
      return f.read(nbytes)
  return read


# ----------------------------------------------------------------------------
# Writing safetensors

_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (name -> array) as a safetensors file; `metadata` is
  the header's `__metadata__` (transformers wants `{'format': 'pt'}`)."""
  arrays = {name: np.asarray(value, order='C')
            for name, value in tensors.items()}
  for name, array in arrays.items():
    if array.dtype not in _SAFETENSORS_NAMES:
      raise ValueError(f'{path}: tensor {name!r} has dtype {array.dtype}, '
                       'which safetensors does not hold.')
  safetensors.numpy.save_file(
      arrays, path,
      metadata={str(k): str(v) for k, v in (metadata or {}).items()} or None)


def write_atomically(path: str, write: Callable[[str], None],
                     overwrite: bool) -> str:
  """`write(staging)` writes a file or directory at the path it is given,
  beside `path`, then renamed to `path`; a failure leaves nothing there."""
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True (--overwrite)'
                          ' to replace it.')
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.tmp-',
                             dir=parent)
  try:
    written = os.path.join(staging, 'out')
    write(written)
    replaced = os.path.join(staging, 'replaced')
    if os.path.exists(path):
      os.rename(path, replaced)
    try:
      os.rename(written, path)
    except OSError:
      if os.path.exists(replaced):
        os.rename(replaced, path)
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return path
