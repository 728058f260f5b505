"""Diving-48: 48 classes of dives, mp4 videos.

The release's layout (V2 annotations), in `data_dir`:

    Diving48_V2_train.json   [{vid_name, label, start_frame, end_frame}]
    Diving48_V2_test.json
    rgb/{vid_name}.mp4

A video is frames `[start_frame, end_frame)` of its file. There is no
validation split: 'val' reads the test list.
"""

from __future__ import annotations

import json
import os

from tsformer_jax.datasets import video_files

VIDEO_DIR = 'rgb'
HOW_TO = (
    'Download Diving48_V2_train.json, Diving48_V2_test.json and the rgb '
    'videos (Diving48_rgb.tar.gz) from '
    'http://www.svcl.ucsd.edu/projects/resound/dataset.html into data_dir, '
    'and unpack the videos into data_dir/rgb/.')


def load(data_dir: str, split_file: str) -> video_files.FileSource:
  """The videos listed in `{data_dir}/{split_file}`."""
  with open(os.path.join(data_dir, split_file), encoding='utf-8') as f:
    items = json.load(f)
  return video_files.FileSource([
      video_files.Entry(
          os.path.join(data_dir, VIDEO_DIR, f'{item["vid_name"]}.mp4'),
          int(item['label']), int(item.get('start_frame', 0)),
          int(item['end_frame']) if 'end_frame' in item else None)
      for item in items])
