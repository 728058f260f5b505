"""Features on disk: a folder with one array per video and what made them.

  DIR/features.json        the settings and the videos (`manifest`)
  DIR/<id>.npy             one video's features, `[windows, ...]`
  DIR/<id>.frames.json     its frame count and rate, and its window count
  DIR/failed.txt           `PATH<TAB>why` per video that failed

A video's id is its path relative to the listing's folder (or to the folder
given), extension dropped; subfolders stay subfolders of DIR. Where a
listing names videos outside its folder, ids are relative to the deepest
folder holding them all. An `.npy` is written under a temporary name and
renamed into place when complete, so one that exists is whole: a rerun
skips it (`is_done`), and a killed run resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import fcntl
import json
import os

import numpy as np

from tsformer_jax import listing

MANIFEST = 'features.json'
FAILED = 'failed.txt'
# What `python -m tsformer_jax.features --videos=DIR` takes as a video.
VIDEO_EXTENSIONS = ('.mp4', '.webm', '.mkv', '.avi', '.mov', '.m4v', '.mpg',
                    '.mpeg', '.ogv', '.flv', '.wmv', '.3gp')
# The manifest's entries that must match for a rerun to add to a folder.
SETTINGS = ('checkpoint', 'layer', 'pool', 'stride_frames', 'window_frames',
            'num_frames', 'sampling_rate', 'dtype')
_PARTIAL = '.partial'  # An array being written; never taken as done.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One video to extract.

  Attributes:
    id: where its features go: `DIR/<id>.npy`.
    path: the video file.
    labels: its class indices from the listing; None where it has none.
  """
  id: str
  path: str
  labels: tuple[int, ...] | None = None


def video_id(path: str, root: str) -> str:
  """`path` relative to `root`, extension dropped, '/'-separated."""
  relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
  return os.path.splitext(relative)[0].replace(os.sep, '/')


def folder_videos(root: str) -> list[Entry]:
  """The video files under `root` (`VIDEO_EXTENSIONS`; hidden ones left
  out), in path order, without labels."""
  paths = []
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = sorted(s for s in subfolders if not s.startswith('.'))
    paths += [os.path.join(folder, f) for f in files if not f.startswith('.')
              and os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS]
  if not paths:
    raise ValueError(f'{root} holds no video file (looked for '
                     f'{", ".join(VIDEO_EXTENSIONS)}).')
  return _unique([Entry(video_id(p, root), p) for p in sorted(paths)])


def listed_videos(path: str, classes: Sequence[str]) -> list[Entry]:
  """The videos of the listing `path` (`listing.read`); labels None for
  all when no line has any."""
  items = listing.read(path, classes)
  if not items:
    raise ValueError(f'{path} lists no video.')
  root = os.path.dirname(os.path.abspath(path))
  paths = [item.path for item in items]
  if any(os.path.relpath(p, root).startswith(os.pardir) for p in paths):
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
  labelled = any(item.labels for item in items)
  return _unique([Entry(video_id(item.path, root), item.path,
                        item.labels if labelled else None)
                  for item in items], [item.line for item in items], path)


def _unique(entries: list[Entry], lines: Sequence[int] | None = None,
            where: str = '') -> list[Entry]:
  """`entries`, failing where two would write the same file."""
  seen = {}
  for i, entry in enumerate(entries):
    if entry.id in seen:
      j = seen[entry.id]
      at = (f'{where}:{lines[i]} ' if lines else '')
      first = f' (line {lines[j]})' if lines else ''
      raise ValueError(
          f'{at}{entry.path} would write the same features as '
          f'{entries[j].path}{first}: DIR/{entry.id}.npy. Each video needs '
          'its own name without extension; rename one, or list it once.')
    seen[entry.id] = i
  return entries


def check_out(out: str) -> str:
  """Makes the folder `out` if missing; fails if it is a file."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out={out} is a file: name a folder (it is made if '
                     'missing).')
  os.makedirs(out, exist_ok=True)
  return out


def manifest(settings: dict, entries: Sequence[Entry],
             classes: Sequence[str] | None) -> dict:
  """features.json's content: `settings` (the keys of `SETTINGS`),
  `classes`, `multi_label` (whether a video has other than one label) and
  the videos."""
  missing = sorted(set(SETTINGS) - set(settings))
  if missing:
    raise ValueError(f'Feature settings lack {missing}.')
  multi_label = any(e.labels is not None and len(e.labels) != 1
                    for e in entries)
  return dict(
      {k: settings[k] for k in SETTINGS},
      classes=list(classes) if classes is not None else None,
      multi_label=multi_label,
      videos=[dict(id=e.id, path=e.path,
                   labels=list(e.labels) if e.labels is not None else None)
              for e in entries])


def check_manifest(out: str, doc: dict):
  """Fails where `out` holds features of other settings than `doc`'s."""
  path = os.path.join(out, MANIFEST)
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding='utf-8') as f:
      there = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} cannot be read ({e}); remove it, or use '
                     'another --out.') from None
  changed = [f'{k} {there.get(k)!r} there, {doc[k]!r} now' for k in SETTINGS
             if there.get(k) != doc[k]]
  if changed:
    raise ValueError(f'{out} holds features of other settings ('
                     f'{"; ".join(changed)}): use another --out, or the same '
                     'settings to resume.')


def write_json(path: str, doc: dict):
  """`doc` as JSON at `path`, renamed into place once whole."""
  partial = path + _PARTIAL
  with open(partial, 'w', encoding='utf-8') as f:
    json.dump(doc, f, indent=1)
  os.replace(partial, path)


def array_path(out: str, entry: Entry) -> str:
  return os.path.join(out, *entry.id.split('/')) + '.npy'


def frames_path(out: str, entry: Entry) -> str:
  return os.path.join(out, *entry.id.split('/')) + '.frames.json'


def is_done(out: str, entry: Entry) -> bool:
  """Whether `entry`'s features are written (whole: see `write_features`)."""
  return os.path.isfile(array_path(out, entry))


def write_features(out: str, entry: Entry, features: np.ndarray,
                   frames: dict):
  """Writes `DIR/<id>.frames.json` (`frames`), then `DIR/<id>.npy`, each
  under a temporary name first: the `.npy`, last, marks the video done."""
  path = array_path(out, entry)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_json(frames_path(out, entry), frames)
  partial = path + _PARTIAL
  with open(partial, 'wb') as f:
    np.save(f, features)  # A file object: np.save adds no suffix.
  os.replace(partial, path)


def drop_failed(out: str, paths: Sequence[str]):
  """Removes the lines of `paths` from failed.txt (making it if missing): a
  run lists its own failures, and retries earlier ones. Locked, as
  `add_failed`: processes share the file."""
  paths = set(paths)
  with open(os.path.join(out, FAILED), 'a+', encoding='utf-8') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    kept = [line for line in f if line.split('\t', 1)[0] not in paths]
    f.seek(0)
    f.truncate()
    f.writelines(kept)


def add_failed(out: str, path: str, why: str):
  """Appends `PATH<TAB>why` to failed.txt."""
  why = ' '.join(why.split())  # One line, whatever the decoder said.
  with open(os.path.join(out, FAILED), 'a', encoding='utf-8') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(f'{path}\t{why}\n')
