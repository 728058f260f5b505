"""Something-Something-V2: 174 classes of template actions, webm videos.

The release's layout, in `data_dir`:

    something-something-v2-labels.json      {template: "index"}
    something-something-v2-train.json       [{id, template, ...}]
    something-something-v2-validation.json
    20bn-something-something-v2/{id}.webm   (or videos/{id}.webm)

The lists bracket a template's objects ("Putting [something] on a surface"),
the labels file does not. Test labels are not public; as the original
TimeSformer, testing uses the validation list.

The webm videos are read directly, as the original read the JPEGs it had
extracted from them (`ffmpeg -i VIDEO -r 30 -q:v 1`) by the recipe
(`configs/default.py`): segments are cut over the video resampled to 30 fps
(`config.data.segment_fps`, `clip_lib.resampled_frames`), the training
short side is drawn inverse-uniformly (`scale_jitter`), and the model takes
BGR (`channel_order`: cv2 decoded those JPEGs).
"""

from __future__ import annotations

import json
import os

from tsformer_jax.datasets import video_files

LABELS_FILE = 'something-something-v2-labels.json'
VIDEO_DIRS = ('20bn-something-something-v2', 'videos')
HOW_TO = (
    'Download Something-Something-V2 (Qualcomm, formerly TwentyBN), unpack '
    'its videos into data_dir/20bn-something-something-v2/ and put the '
    'label files of the release (something-something-v2-labels.json, '
    '-train.json, -validation.json) in data_dir.')


def read_labels(path: str) -> dict[str, int]:
  """`something-something-v2-labels.json`: template -> class index."""
  with open(path, encoding='utf-8') as f:
    return {template: int(index) for template, index in json.load(f).items()}


def template_key(template: str) -> str:
  """A list's template as the labels file writes it: brackets dropped."""
  return template.replace('[', '').replace(']', '')


def video_dir(data_dir: str) -> str:
  """The first of `VIDEO_DIRS` in `data_dir` that exists."""
  for name in VIDEO_DIRS:
    path = os.path.join(data_dir, name)
    if os.path.isdir(path):
      return path
  raise FileNotFoundError(f'No video folder in {data_dir!r}: expected one '
                          f'of {list(VIDEO_DIRS)}. {HOW_TO}')


def load(data_dir: str, split_file: str) -> video_files.FileSource:
  """The videos listed in `{data_dir}/{split_file}`, labelled by template.

  Raises:
    ValueError: a template that the labels file does not have.
  """
  labels = read_labels(os.path.join(data_dir, LABELS_FILE))
  videos = video_dir(data_dir)
  path = os.path.join(data_dir, split_file)
  with open(path, encoding='utf-8') as f:
    items = json.load(f)
  entries = []
  for item in items:
    key = template_key(item['template'])
    if key not in labels:
      raise ValueError(f'{path}: video {item["id"]} has template '
                       f'{item["template"]!r}, which {LABELS_FILE} lacks.')
    entries.append(video_files.Entry(
        os.path.join(videos, f'{item["id"]}.webm'), labels[key]))
  return video_files.FileSource(entries)


def class_names(data_dir: str) -> list[str] | None:
  """Templates by class index from the data's labels file, if present."""
  path = os.path.join(data_dir, LABELS_FILE)
  if not data_dir or not os.path.exists(path):
    return None
  labels = read_labels(path)
  names = sorted(labels, key=labels.get)
  if [labels[n] for n in names] != list(range(len(names))):
    raise ValueError(f'{path}: class indices are not 0..{len(names) - 1}.')
  return names
