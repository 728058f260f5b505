"""Ranking metrics for multi-label videos: average precision and its mean.

The Charades protocol (PySlowFast's `get_map`, after the dataset's own
evaluation script): per class, the non-interpolated average precision of
the videos ranked by that class's score; the mean over the classes that have
at least one positive in the evaluated set (the others are excluded, not
counted as 0). Numpy only: evaluation, the probe and tests all share it.
"""

from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
  """The non-interpolated average precision of ranking by `scores`.

  sklearn's `average_precision_score`: sum over score thresholds of
  (recall_n - recall_{n-1}) * precision_n, where videos tied on a score
  enter the ranking together.

  Args:
    scores: [N] a class's score per video; higher ranks first.
    positives: [N] whether the video has the class (bool, or 0/1).

  Returns:
    The AP in [0, 1]; NaN when no video is positive (undefined).

  Raises:
    ValueError: `scores` and `positives` are not two [N] arrays.
  """
  scores = np.asarray(scores, np.float64)
  positives = np.asarray(positives).astype(bool)
  if scores.ndim != 1 or scores.shape != positives.shape:
    raise ValueError(f'average_precision takes two [N] arrays; got scores '
                     f'{scores.shape} and positives {positives.shape}.')
  if not positives.any():
    return float('nan')
  order = np.argsort(-scores, kind='stable')
  scores, positives = scores[order], positives[order]
  true_pos = np.cumsum(positives)
  # A threshold is the last video of each run of tied scores.
  last_of_tie = np.r_[scores[1:] != scores[:-1], True]
  true_pos = true_pos[last_of_tie]
  ranked = np.flatnonzero(last_of_tie) + 1
  precision = true_pos / ranked
  # Dividing by the positives last keeps a perfect ranking at exactly 1.
  new_pos = np.diff(true_pos, prepend=0)
  return float(np.sum(new_pos * precision) / true_pos[-1])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray
                           ) -> tuple[float, np.ndarray]:
  """The mean AP over the classes with at least one positive.

  Args:
    scores: [N, C] each video's score per class.
    targets: [N, C] multi-hot labels (nonzero: positive).

  Returns:
    (mAP, per-class APs [C]), the APs NaN for classes without a positive
    (excluded from the mean); the mAP is NaN when no class has one.

  Raises:
    ValueError: the arrays are not both [N, C].
  """
  scores, targets = np.asarray(scores), np.asarray(targets)
  if scores.ndim != 2 or scores.shape != targets.shape:
    raise ValueError(f'mean_average_precision takes two [N, C] arrays; got '
                     f'scores {scores.shape} and targets {targets.shape}.')
  per_class = np.array([average_precision(scores[:, c], targets[:, c] != 0)
                        for c in range(scores.shape[1])], np.float64)
  kept = ~np.isnan(per_class)
  mean = float(per_class[kept].mean()) if kept.any() else float('nan')
  return mean, per_class
