"""`torch.save` files written without torch.

Exporting weights to the original's `.pyth` should not need PyTorch
installed, and torch's zip format is small and fully specified: a pickle
naming only torch's tensor-rebuilding function, its storage types and
`collections.OrderedDict`, and each storage's bytes in its own record.
"""

from __future__ import annotations

from collections.abc import Mapping
import pickle
import struct
import sys
from typing import Any
import zipfile

import numpy as np

from tsformer_jax import tensor_io

_STORAGE_NAMES = {np.dtype(v): k for k, v in tensor_io.STORAGE_DTYPES.items()}


def _little_endian(array: np.ndarray) -> bytes:
  return (array.byteswap() if sys.byteorder == 'big' else array).tobytes()


# A storage's bytes start on this boundary, as torch writes them (so that
# torch.load(mmap=True) maps them in place).
_TORCH_ALIGNMENT = 64
# The zip's constant-size local header, before the name and extra field.
_ZIP_LOCAL_HEADER = 30


def write_torch(path: str, obj: Any) -> None:
  """Writes `obj` as `torch.save` does (its zip format), without torch.

  `obj` nests dicts, lists and tuples of str, int, float, bool, None and
  numpy arrays; arrays become CPU tensors of their dtype (those of
  `tensor_io.STORAGE_DTYPES`). `torch.load(path, weights_only=True)` loads
  the file, and so does `tensor_io.read_torch`.
  """
  pickler = _TorchPickler()
  data = pickler.dumps(obj)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    def record(name, payload):
      _write_aligned(archive, f'archive/{name}', payload)
    record('data.pkl', data)
    record('.format_version', b'1')
    record('.storage_alignment', str(_TORCH_ALIGNMENT).encode())
    record('byteorder', b'little')
    for key, array in enumerate(pickler.storages):
      record(f'data/{key}', _little_endian(array))
    record('version', b'3\n')


def _write_aligned(archive: zipfile.ZipFile, name: str, payload: bytes):
  """One stored zip entry whose data starts on `_TORCH_ALIGNMENT`, padded
  with an extra field as torch pads it ('FB', then its length, then 'Z's)."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  # zipfile adds a 20-byte zip64 field for entries near 2 GiB and above.
  zip64 = 20 if len(payload) * 1.05 > zipfile.ZIP64_LIMIT else 0
  start = (archive.fp.tell() + _ZIP_LOCAL_HEADER + len(name.encode()) + 4 +
           zip64)
  padding = -start % _TORCH_ALIGNMENT
  info.extra = struct.pack('<2sH', b'FB', padding) + b'Z' * padding
  archive.writestr(info, payload)


class _TorchPickler:
  """Pickle protocol 2, written opcode by opcode as torch.save writes it.

  Python's pickler names a global only after importing it; the names here
  (torch's) are written without importing anything.
  """

  def __init__(self):
    self.storages: list[np.ndarray] = []
    self._out: list[bytes] = []

  def dumps(self, obj: Any) -> bytes:
    self._out = [pickle.PROTO + b'\x02']
    self._save(obj)
    self._out.append(pickle.STOP)
    return b''.join(self._out)

  def _save(self, obj: Any):
    w = self._out.append
    if isinstance(obj, Mapping):
      w(pickle.EMPTY_DICT)
      if obj:
        w(pickle.MARK)
        for key, value in obj.items():
          self._save(key)
          self._save(value)
        w(pickle.SETITEMS)
    elif isinstance(obj, list):
      w(pickle.EMPTY_LIST)
      if obj:
        w(pickle.MARK)
        for value in obj:
          self._save(value)
        w(pickle.APPENDS)
    elif isinstance(obj, tuple):
      w(pickle.MARK)
      for value in obj:
        self._save(value)
      w(pickle.TUPLE)
    elif obj is None:
      w(pickle.NONE)
    elif isinstance(obj, (bool, np.bool_)):
      w(pickle.NEWTRUE if obj else pickle.NEWFALSE)
    elif isinstance(obj, (int, np.integer)):
      obj = int(obj)
      if -2 ** 31 <= obj < 2 ** 31:
        w(pickle.BININT + struct.pack('<i', obj))
      else:
        data = obj.to_bytes(obj.bit_length() // 8 + 1, 'little', signed=True)
        w(pickle.LONG1 + bytes([len(data)]) + data)
    elif isinstance(obj, (float, np.floating)):
      w(pickle.BINFLOAT + struct.pack('>d', float(obj)))
    elif isinstance(obj, str):
      data = obj.encode('utf-8')
      w(pickle.BINUNICODE + struct.pack('<I', len(data)) + data)
    elif hasattr(obj, '__array__'):  # numpy, tensor_io.LazyArray, jax.
      self._save_tensor(np.asarray(obj))
    else:
      raise TypeError(f'write_torch cannot write a {type(obj).__name__}.')

  def _save_tensor(self, array: np.ndarray):
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
    requires_grad, backward_hooks)`, the storage a persistent id."""
    if array.dtype not in _STORAGE_NAMES:
      raise TypeError(f'write_torch cannot write arrays of {array.dtype}.')
    array = np.asarray(array, order='C')  # Keeps 0-d arrays 0-d.
    stride, step = [], 1
    for size in reversed(array.shape):  # Contiguous, as torch counts it.
      stride.insert(0, step)
      step *= max(size, 1)
    w = self._out.append
    w(pickle.GLOBAL + b'torch._utils\n_rebuild_tensor_v2\n')
    w(pickle.MARK)
    w(pickle.MARK)
    self._save('storage')
    w(pickle.GLOBAL + f'torch\n{_STORAGE_NAMES[array.dtype]}\n'.encode())
    self._save(str(len(self.storages)))
    self._save('cpu')
    self._save(array.size)
    w(pickle.TUPLE)
    w(pickle.BINPERSID)
    self._save(0)
    self._save(tuple(array.shape))
    self._save(tuple(stride))
    self._save(False)
    w(pickle.GLOBAL + b'collections\nOrderedDict\n' + pickle.EMPTY_TUPLE +
      pickle.REDUCE)
    w(pickle.TUPLE)
    w(pickle.REDUCE)
    self.storages.append(array)
