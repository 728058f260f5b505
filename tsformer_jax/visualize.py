r"""Where a model looks: attention rollout of one video, drawn.

  python -m tsformer_jax.visualize --checkpoint=CKPT VIDEO --out=DIR
      [--alpha=0.5] [--frame_ms=250] [--overwrite]

Classifies the centre clip and crop of VIDEO, taken as evaluation does, and
rolls its attention out (`rollout.py`). DIR (made if missing; images already
there are replaced only with `--overwrite`) receives:

  rollout_frames.png      the frames with the class token's heatmap overlaid
  rollout.gif             the same, animated
  temporal_importance.png each frame's share of the heatmap
"""

from __future__ import annotations

import dataclasses
import functools
import os

from absl import flags
import jax
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image

from tsformer_jax import attention
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import clip_lib
from tsformer_jax import evaluation
from tsformer_jax import model as model_lib
from tsformer_jax import rollout
from tsformer_jax import video_io

_ALPHA = flags.DEFINE_float('alpha', 0.5, 'Opacity of the heatmap overlay.',
                            lower_bound=0.0, upper_bound=1.0)
_FRAME_MS = flags.DEFINE_integer('frame_ms', 250, 'GIF frame duration (ms).',
                                 lower_bound=0)

FRAMES_PNG = 'rollout_frames.png'
GIF = 'rollout.gif'
IMPORTANCE_PNG = 'temporal_importance.png'
# GIF frames are enlarged (nearest neighbour) to at least this short side.
_GIF_MIN_SIDE = 256


@dataclasses.dataclass(frozen=True)
class Explanation:
  """One clip, its prediction and its attention rollout.

  Attributes:
    indices: the video's frame indices of the clip, int `[T]`.
    frames: the clip as shown to the model before normalising, uint8
      `[T, H, W, 3]`.
    probabilities: softmax over the classes `[classes]` (empty without a
      head).
    heatmaps: the class token's rollout over the patches `[T, Hp, Wp]`.
    importance: each frame's share of it `[T]`.
  """
  indices: np.ndarray
  frames: np.ndarray
  probabilities: np.ndarray
  heatmaps: np.ndarray
  importance: np.ndarray


def sample_clip(video: clip_lib.Video, spec: clip_lib.ClipSpec
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The evaluation view of one centre clip and centre crop.

  Returns:
    `(indices [T], frames uint8 [T, H, W, 3], clip float32 [T, H, W, 3])`;
    `clip` equals `clip_lib.eval_views` with one clip and one crop.
  """
  spec = dataclasses.replace(spec, num_clips=1, num_crops=1)
  indices = clip_lib.temporal_indices(video.num_frames, video.fps,
                                      spec, clip=0)
  pixels = clip_lib.eval_crops(video.frames(indices), spec)[0]
  # Float pixels (the original's resize) are shown rounded.
  frames = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
  return indices, frames, clip_lib.normalize(pixels, spec)


def _analyse(model: model_lib.TimeSformer, params, clips: jax.Array):
  """clips `[B, T, H, W, 3]` -> (outputs, heatmaps `[B, T, Hp, Wp]`,
  importance `[B, T]`): the forward pass and its rollout."""
  outputs, state = model.apply({'params': params}, clips,
                               mutable=['attention'])
  scheme = attention.get_scheme(model.attention)
  flow = rollout.rollout(state['attention'], scheme, model.grid)
  heatmaps = rollout.cls_heatmaps(
      flow, model.grid, rollout.num_class_tokens(scheme, model.grid))
  return outputs, heatmaps, rollout.temporal_importance(heatmaps)


def explain(config, params, video: clip_lib.Video) -> Explanation:
  """Samples the clip, classifies it and rolls its attention out."""
  model = model_lib.create_model(config)
  indices, frames, clip = sample_clip(video,
                                      clip_lib.clip_spec(config))
  analyse = jax.jit(
      functools.partial(_analyse, model),
      compiler_options=model_lib.inference_compiler_options(config, 1))
  outputs, heatmaps, importance = analyse(params, clip[None])
  probabilities = (jax.nn.softmax(outputs[0]) if model.num_classes
                   else np.zeros((0,), np.float32))
  return Explanation(
      indices=indices, frames=frames,
      probabilities=np.asarray(probabilities),
      heatmaps=np.asarray(heatmaps[0]), importance=np.asarray(importance[0]))


def pixel_heatmaps(heatmaps: np.ndarray, frame_shape: tuple[int, int]
                   ) -> np.ndarray:
  """`[T, Hp, Wp]` -> `[T, H, W]`, bilinear, scaled to [0, 1] over the clip
  (one scale for all frames, so that frames compare)."""
  resized = np.asarray(jax.image.resize(
      heatmaps, (heatmaps.shape[0],) + tuple(frame_shape), 'bilinear'))
  low, high = resized.min(), resized.max()
  return (resized - low) / (high - low) if high > low else resized * 0.0


def overlay(frames: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
  """uint8 frames `[T, H, W, 3]` blended with the colour-mapped `heat`
  `[T, H, W]` (in [0, 1]): uint8 `[T, H, W, 3]`."""
  colours = colormaps['jet'](heat)[..., :3] * 255.0
  blended = (1.0 - alpha) * frames.astype(np.float32) + alpha * colours
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _figure(size: tuple[float, float]) -> Figure:
  """A figure drawn by Agg, outside pyplot's global state."""
  fig = Figure(figsize=size)
  FigureCanvasAgg(fig)
  return fig


def write_frames_png(path: str, images: np.ndarray, indices: np.ndarray,
                     title: str):
  """A grid of the overlaid frames, each titled with its frame index."""
  count = len(images)
  cols = min(count, 8)
  rows = -(-count // cols)
  fig = _figure((2.0 * cols, 2.0 * rows + 0.4))
  axes = fig.subplots(rows, cols, squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis('off')
    if i < count:
      ax.imshow(images[i])
      ax.set_title(f'frame {indices[i]}', fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.savefig(path, dpi=100, bbox_inches='tight')


def write_gif(path: str, images: np.ndarray, frame_ms: int):
  """The overlaid frames as a looping GIF, enlarged to a visible size."""
  scale = max(1, -(-_GIF_MIN_SIDE // min(images.shape[1:3])))
  size = (images.shape[2] * scale, images.shape[1] * scale)
  pictures = [Image.fromarray(image).resize(size, Image.NEAREST)
              for image in images]
  pictures[0].save(path, save_all=True, append_images=pictures[1:],
                   duration=frame_ms, loop=0)


def write_importance_png(path: str, importance: np.ndarray,
                         indices: np.ndarray, title: str):
  """A bar plot of each frame's share of the heatmap."""
  fig = _figure((max(4.0, 0.5 * len(importance)), 3.0))
  ax = fig.subplots()
  ax.bar(np.arange(len(importance)), importance)
  ax.set_xticks(np.arange(len(importance)), [str(i) for i in indices],
                fontsize=7)
  ax.set_xlabel('frame')
  ax.set_ylabel('share of the rollout')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def output_files(out_dir: str) -> list[str]:
  """The paths `visualize` writes in `out_dir`."""
  return [os.path.join(out_dir, name)
          for name in (FRAMES_PNG, GIF, IMPORTANCE_PNG)]


def visualize(checkpoint: str, video_path: str, out_dir: str, *,
              alpha: float = 0.5, frame_ms: int = 250) -> dict:
  """Writes the three images for one video; returns what it found.

  Returns:
    `{'label': name or None, 'probability': float or None,
    'files': [paths written]}`.

  Raises:
    FileNotFoundError: no checkpoint or no video at the path given.
    NotADirectoryError: `out_dir` is a file.
    clip_lib.BadVideoError: the video cannot be decoded.
    ValueError: the checkpoint cannot be read.
  """
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise NotADirectoryError(f'{out_dir} is a file: the images go in a '
                             'folder; name another.')
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f'No checkpoint at {checkpoint}: pass a '
                            'checkpoint file or directory (a training '
                            "workdir's checkpoints/ works).")
  if not os.path.isfile(video_path):
    raise FileNotFoundError(f'No video file at {video_path}.')
  # The video's header first: a bad file fails before the model loads.
  video = video_io.VideoFile(video_path)
  if video.num_frames < 1:
    raise clip_lib.BadVideoError(f'{video_path}: no frames.')
  config, params = checkpoints.load_checkpoint(checkpoint)
  result = explain(config, params, video)

  label = probability = None
  title = os.path.basename(video_path)
  if result.probabilities.size:
    best = int(np.argmax(result.probabilities))
    label = evaluation.label_names(config)[best]
    probability = float(result.probabilities[best])
    title = f'{title}: {label} ({probability:.2f})'
  heat = pixel_heatmaps(result.heatmaps, result.frames.shape[1:3])
  images = overlay(result.frames, heat, alpha)
  os.makedirs(out_dir, exist_ok=True)
  files = output_files(out_dir)
  write_frames_png(files[0], images, result.indices, title)
  write_gif(files[1], images, frame_ms)
  write_importance_png(files[2], result.importance, result.indices, title)
  return dict(label=label, probability=probability, files=files)


@cli.takes(cli.CHECKPOINT, cli.OUT, cli.OVERWRITE)
def main(argv):
  if len(argv) != 2 or not cli.CHECKPOINT.value or not cli.OUT.value:
    raise cli.Error('Pass --checkpoint=CKPT, --out=DIR and exactly one '
                    'VIDEO (--help shows more).')
  out = cli.OUT.value
  existing = [os.path.basename(path) for path in output_files(out)
              if os.path.exists(path)]
  if existing and not cli.OVERWRITE.value:
    raise cli.Error(f'{out} already holds {", ".join(existing)}: pass '
                    '--overwrite to replace them, or name another --out.')
  try:
    found = visualize(cli.CHECKPOINT.value, argv[1], out,
                      alpha=_ALPHA.value, frame_ms=_FRAME_MS.value)
  except clip_lib.BadVideoError as e:
    raise cli.Error(f'cannot decode the video: {e}', status=1) from e
  except (FileNotFoundError, NotADirectoryError, ValueError) as e:
    raise cli.Error(str(e), status=1) from e
  if found['label'] is None:
    print('predicted: (no classification head)')
  else:
    print(f"predicted: {found['label']} ({found['probability']:.3f})")
  for path in found['files']:
    print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
