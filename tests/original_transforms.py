"""The original's data path, written out in torch from its code.

PySlowFast as the original TimeSformer ships it: `datasets/decoder.py`
(`get_start_end_idx`, `temporal_sampling`), `datasets/utils.py`
(`tensor_normalize`, `spatial_sampling`), `datasets/transform.py`
(`random_short_side_scale_jitter`, `random_crop`, `uniform_crop`,
`horizontal_flip`) and the loaders' test branches (`kinetics.py`,
`ssv2.py`). Draws are passed in rather than drawn, so that a test can give
both pipelines the same ones. Frames are `[C, T, H, W]` float tensors, as
the loaders hand them to `spatial_sampling`.
"""

import math

import av
import numpy as np
import torch
import torch.nn.functional as F


def decode_all(path):
  """Every frame of `path` as the original's PyAV decoder converts it
  (`frame.to_rgb().to_ndarray()`): `(uint8 tensor [F, H, W, 3], fps)`."""
  with av.open(str(path)) as container:
    fps = float(container.streams.video[0].average_rate)
    frames = [f.to_rgb().to_ndarray() for f in container.decode(video=0)]
  return torch.as_tensor(np.stack(frames)), fps


def get_start_end_idx(video_size, clip_size, clip_idx, num_clips):
  """The first and last frame (fractional) of test clip `clip_idx`."""
  delta = max(video_size - clip_size, 0)
  start_idx = delta * clip_idx / num_clips
  return start_idx, start_idx + clip_size - 1


def temporal_sampling(frames, start_idx, end_idx, num_samples):
  index = torch.linspace(start_idx, end_idx, num_samples)
  index = torch.clamp(index, 0, frames.shape[0] - 1).long()
  return torch.index_select(frames, 0, index)


def get_seq_frames(video_length, num_frames):
  """SSv2's test frames: the middle of each of `num_frames` segments."""
  seg_size = float(video_length - 1) / num_frames
  seq = []
  for i in range(num_frames):
    start = int(np.round(seg_size * i))
    end = int(np.round(seg_size * (i + 1)))
    seq.append((start + end) // 2)
  return seq


def tensor_normalize(frames, mean, std):
  """uint8 `[T, H, W, C]` -> float `(x / 255 - mean) / std`."""
  frames = frames.float() / 255.0
  return (frames - torch.tensor(mean)) / torch.tensor(std)


def short_side_scale(images, size):
  """`random_short_side_scale_jitter` once its size is drawn: the short
  side to `size`, the long side `floor`ed alike, bilinear without
  antialiasing; frames already that size are left as they are."""
  height, width = images.shape[2], images.shape[3]
  if (width <= height and width == size) or (height <= width and
                                             height == size):
    return images
  new_width = new_height = size
  if width < height:
    new_height = int(math.floor((float(height) / width) * size))
  else:
    new_width = int(math.floor((float(width) / height) * size))
  return F.interpolate(images, size=(new_height, new_width), mode='bilinear',
                       align_corners=False)


def crop_at(images, size, y_offset, x_offset):
  """`random_crop` once its offsets are drawn."""
  return images[:, :, y_offset:y_offset + size, x_offset:x_offset + size]


def uniform_crop(images, size, spatial_idx):
  """Test crop `spatial_idx` (0, 1, 2): the start, centre and end of the
  long side (the centre rounded up; width first where square)."""
  height, width = images.shape[2], images.shape[3]
  y_offset = int(math.ceil((height - size) / 2))
  x_offset = int(math.ceil((width - size) / 2))
  if height > width:
    if spatial_idx == 0:
      y_offset = 0
    elif spatial_idx == 2:
      y_offset = height - size
  else:
    if spatial_idx == 0:
      x_offset = 0
    elif spatial_idx == 2:
      x_offset = width - size
  return crop_at(images, size, y_offset, x_offset)


def three_crop_views(frames, crop_size, mean, std):
  """The test loaders' three views of one clip (Kinetics' and SSv2's alike
  with three crops): uint8 `[T, H, W, C]` normalised, made `[C, T, H, W]`,
  its short side scaled to `crop_size`, cut by `uniform_crop` 0, 1 and 2;
  the ViT's `index_select` of all T frames keeps them. Float `[3, T, crop,
  crop, C]`, our layout."""
  frames = tensor_normalize(frames, mean, std).permute(3, 0, 1, 2)
  scaled = short_side_scale(frames, crop_size)
  views = [uniform_crop(scaled, crop_size, i) for i in range(3)]
  return torch.stack([v.permute(1, 2, 3, 0) for v in views])
