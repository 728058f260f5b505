"""Average precision and mAP against a brute-force reference."""

import numpy as np
import pytest

from tsformer_jax import metrics


def _brute_force_ap(scores, positives):
  """AP as the mean, over positives, of the precision among the videos that
  score at least as high (ties enter together: sklearn's definition)."""
  precisions = []
  for i in np.flatnonzero(positives):
    above = scores >= scores[i]
    precisions.append(positives[above].sum() / above.sum())
  return float(np.mean(precisions))


@pytest.mark.parametrize('seed', range(20))
def test_ap_matches_brute_force_with_and_without_ties(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 40))
  # Half the seeds draw scores from few values, so that ties are common.
  scores = (rng.integers(0, 4, n).astype(np.float64) if seed % 2
            else rng.normal(size=n))
  positives = rng.random(n) < 0.4
  positives[rng.integers(n)] = True
  np.testing.assert_allclose(metrics.average_precision(scores, positives),
                             _brute_force_ap(scores, positives), rtol=1e-12)


def test_ap_known_values():
  # sklearn's documented example: average_precision_score -> 0.8333...
  assert metrics.average_precision(
      np.array([0.1, 0.4, 0.35, 0.8]),
      np.array([0, 0, 1, 1])) == pytest.approx(5 / 6, abs=1e-12)
  # A perfect ranking (exactly 1, however many positives), and one that
  # puts the only positive last.
  assert metrics.average_precision([3., 2., 1.], [1, 1, 0]) == 1.0
  assert metrics.average_precision(np.arange(300.), np.arange(300) > 13) == 1
  assert metrics.average_precision([3., 2., 1.], [0, 0, 1]) == pytest.approx(
      1 / 3, abs=1e-12)
  # All tied: the precision is the positives' share.
  assert metrics.average_precision([1., 1., 1., 1.], [1, 0, 0, 0]) == 0.25


def test_ap_is_nan_without_positives():
  assert np.isnan(metrics.average_precision([0.3, 0.2], [False, False]))


def test_map_excludes_classes_without_positives():
  scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.6, 0.3, 0.7]])
  targets = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]], np.uint8)
  mean, per_class = metrics.mean_average_precision(scores, targets)
  expected = [_brute_force_ap(scores[:, c], targets[:, c] == 1)
              for c in (0, 2)]
  np.testing.assert_allclose(per_class[[0, 2]], expected, rtol=1e-12)
  assert np.isnan(per_class[1])
  assert mean == pytest.approx(np.mean(expected), abs=1e-12)


def test_map_without_any_positive_is_nan():
  mean, per_class = metrics.mean_average_precision(np.zeros((2, 3)),
                                                   np.zeros((2, 3)))
  assert np.isnan(mean) and np.isnan(per_class).all()


@pytest.mark.parametrize('scores, positives', [
    (np.zeros((3, 2)), np.zeros((3, 2))),
    (np.zeros(3), np.zeros(4))])
def test_ap_rejects_misshapen_input(scores, positives):
  with pytest.raises(ValueError, match=r'two \[N\] arrays'):
    metrics.average_precision(scores, positives)


def test_map_rejects_misshapen_input():
  with pytest.raises(ValueError, match=r'two \[N, C\] arrays'):
    metrics.mean_average_precision(np.zeros((3, 2)), np.zeros((3, 3)))
