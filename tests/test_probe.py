"""Frozen-feature evaluation: k-NN, the linear probe, the probe CLI."""

import json
import os

import jax
import numpy as np
import pytest

import tsformer_jax
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import metrics
from tsformer_jax import probe
from tsformer_jax import probing

from conftest import write_listing


def write_features_dir(folder, vectors, labels, classes=None, pool='cls',
                       skip=()):
  """A features folder as `tsformer_jax.features` writes it (contract 3):
  `features.json` and `<id>.npy` per video; `vectors[i]` is saved as
  video i's `[windows, D]` (or token grid) array, and the videos in `skip`
  get no .npy (failed)."""
  os.makedirs(folder, exist_ok=True)
  videos = []
  for i, (vector, label) in enumerate(zip(vectors, labels, strict=True)):
    video_id = f'part{i % 2}/video{i:04d}'
    videos.append(dict(id=video_id, path=f'/data/{video_id}.mp4',
                       labels=None if label is None
                       else [int(c) for c in label]))
    if i in skip:
      continue
    os.makedirs(os.path.join(folder, f'part{i % 2}'), exist_ok=True)
    np.save(os.path.join(folder, video_id + '.npy'),
            np.asarray(vector, np.float32))
  multi = any(y is not None and len(y) != 1 for y in labels)
  info = dict(checkpoint='ckpt', layer=-1, pool=pool, stride_frames=8,
              window_frames=16, num_frames=8, sampling_rate=2,
              dtype='float32', classes=classes, multi_label=multi,
              videos=videos)
  with open(os.path.join(folder, 'features.json'), 'w') as f:
    json.dump(info, f)
  return str(folder)


def blobs(n, num_classes, dim, seed, spread=0.3):
  """Separable data: `[n, dim]` points around one unit centre per class,
  and their labels `[n]`."""
  rng = np.random.default_rng(seed)
  centres = np.eye(num_classes, dim) * 3
  labels = rng.integers(num_classes, size=n)
  return (centres[labels] + spread * rng.normal(size=(n, dim))
          ).astype(np.float32), labels


def run_probe(args, capsys):
  status = cli.call(probe.main, ['probe', *args])
  out, err = capsys.readouterr()
  return status, out, err


# k-NN.


def brute_force_knn(train_x, train_y, test_x, k, temperature):
  """score_c = sum over the k most cosine-similar train rows i of
  exp(s_i / tau) * y_ic, one test row at a time, in float64."""
  scores = np.zeros((len(test_x), train_y.shape[1]))
  for j, query in enumerate(test_x.astype(np.float64)):
    cosines = [query @ x / np.linalg.norm(query) / np.linalg.norm(x)
               for x in train_x.astype(np.float64)]
    for i in np.argsort(cosines)[::-1][:k]:
      scores[j] += np.exp(cosines[i] / temperature) * train_y[i]
  return scores


@pytest.mark.parametrize('k', [1, 7, 60])  # 60: more than train holds.
def test_knn_matches_a_brute_force_loop(k):
  rng = np.random.default_rng(k)
  train_x = rng.normal(size=(50, 8)).astype(np.float32)
  test_x = rng.normal(size=(600, 8)).astype(np.float32)  # Two blocks.
  train_y = probing.targets([(c,) for c in rng.integers(4, size=50)], 4)
  got = probing.knn_scores(train_x, train_y, test_x, k=k, temperature=0.1)
  want = brute_force_knn(train_x, train_y, test_x, min(k, 50), 0.1)
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_knn_adds_multi_hot_votes():
  rng = np.random.default_rng(1)
  train_x = rng.normal(size=(30, 6)).astype(np.float32)
  test_x = rng.normal(size=(5, 6)).astype(np.float32)
  train_y = (rng.uniform(size=(30, 5)) < 0.4).astype(np.float32)
  got = probing.knn_scores(train_x, train_y, test_x, k=20, temperature=0.07)
  want = brute_force_knn(train_x, train_y, test_x, 20, 0.07)
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_top_k_accuracy_counts_ties_lower_class_first():
  scores = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
  labels = np.array([1, 2, 0])
  assert probing.top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
  assert probing.top_k_accuracy(scores, labels, 2) == pytest.approx(1.0)


# The linear probe.


def test_the_fit_reaches_the_regularised_optimum():
  # The objective is convex: at its minimum the gradient, written out
  # here in numpy, vanishes.
  x, labels = blobs(200, 3, 10, seed=0, spread=1.5)
  y = probing.targets([(c,) for c in labels], 3)
  weight_decay = 1e-2
  params, steps = probing.fit_linear(x, y, np.float32(weight_decay),
                                     multi_label=False)
  w, b = np.asarray(params['w'], np.float64), np.asarray(params['b'])
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad_w = x.T @ (p - y) / len(x) + weight_decay * w
  grad_b = (p - y).mean(0)
  assert int(steps) < probing.MAX_STEPS
  assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4


def test_the_sigmoid_fit_reaches_its_optimum():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(150, 6)).astype(np.float32)
  y = (x[:, :4] + rng.normal(size=(150, 4)) > 0).astype(np.float32)
  params, _ = probing.fit_linear(x, y, np.float32(1e-2), multi_label=True)
  w, b = np.asarray(params['w'], np.float64), np.asarray(params['b'])
  p = 1 / (1 + np.exp(-(x @ w + b)))
  grad_w = x.T @ (p - y) / len(x) + 1e-2 * w
  assert np.abs(grad_w).max() < 1e-4 and np.abs((p - y).mean(0)).max() < 1e-4


def test_held_out_split_takes_a_fifth_of_each_class():
  labels = [(0,)] * 50 + [(1,)] * 10 + [(2,)]
  fit, held = probing.held_out_split(labels, 0.2, seed=0)
  first = np.array([y[0] for y in labels])
  assert np.bincount(first[held], minlength=3).tolist() == [10, 2, 0]
  assert sorted(np.r_[fit, held].tolist()) == list(range(61))
  again = probing.held_out_split(labels, 0.2, seed=0)
  assert held.tolist() == again[1].tolist()
  assert held.tolist() != probing.held_out_split(labels, 0.2, 1)[1].tolist()


def feature_set(x, labels, classes=None, source='set'):
  labels = [tuple(y) if np.ndim(y) else (int(y),) for y in labels]
  classes = classes or [f'c{i}' for i in range(1 + max(map(max, labels)))]
  return probing.FeatureSet(source, [f'v{i}' for i in range(len(x))], x,
                            labels, classes,
                            any(len(y) != 1 for y in labels), {})


def test_the_probe_separates_separable_classes():
  train = feature_set(*blobs(300, 4, 12, seed=0))
  test = feature_set(*blobs(200, 4, 12, seed=1))
  result = probing.evaluate(train, test)
  assert result['linear']['top1'] == 1.0
  assert result['knn']['top1'] == 1.0
  assert 'top5' not in result['linear']  # 4 classes.
  assert (result['n_train'], result['n_test']) == (300, 200)
  assert result == probing.evaluate(train, test)  # Deterministic.


def test_the_weight_decay_is_the_held_out_best():
  # 40 videos in 64 dimensions, one of which carries the class: the
  # weight decays score differently on the held-out part.
  rng = np.random.default_rng(0)
  labels = rng.integers(2, size=40)
  x = rng.normal(size=(40, 64)).astype(np.float32)
  x[:, 0] += 1.2 * (2 * labels - 1)
  train = feature_set(x, labels)
  best, held_out = probing.choose_weight_decay(train, 2, False, seed=0)
  # The same scores, fitted on the split by hand.
  fit, held = probing.held_out_split(train.labels, probing.HELD_OUT, 0)
  y = np.eye(2, dtype=np.float32)[labels]
  want = {wd: probing.top_k_accuracy(
      probing.linear_scores(x[fit], y[fit], x[held], wd, False),
      labels[held], 1) for wd in probing.WEIGHT_DECAYS}
  assert held_out == want and len(set(want.values())) > 1
  # The best, ties going to the larger weight decay.
  assert best == max(wd for wd, v in want.items()
                     if v == max(want.values()))
  assert (best, held_out) == probing.choose_weight_decay(train, 2, False, 0)
  # Another seed holds out other videos, and chooses otherwise.
  assert probing.choose_weight_decay(train, 2, False, seed=3)[0] != best


# Multi-label sets.


def test_multi_label_sets_report_map():
  # Class c is present where feature c is positive; class 3 never is in
  # test, so 3 of 4 classes are scored; perfectly separable: mAP 1.
  def make(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    hot = x > 0.3
    x = np.where(hot, x + 1.0, x - 1.0).astype(np.float32)
    return x, hot
  train_x, train_hot = make(400, 0)
  test_x, test_hot = make(100, 1)
  test_hot[:, 3] = False
  classes = ['a', 'b', 'c', 'd']
  to_labels = lambda hot: [tuple(np.flatnonzero(h)) for h in hot]
  train = feature_set(train_x, to_labels(train_hot), classes)
  test = feature_set(test_x, to_labels(test_hot), classes)
  assert train.multi_label
  result = probing.evaluate(train, test)
  assert result['multi_label'] and 'top1' not in result['linear']
  assert result['linear']['mAP'] == pytest.approx(1.0, abs=1e-6)
  assert result['linear']['classes_scored'] == 3
  knn = probing.knn_scores(train_x, train_hot.astype(np.float32), test_x)
  want, _ = metrics.mean_average_precision(knn, test_hot)
  assert result['knn']['mAP'] == pytest.approx(want, abs=1e-9)
  assert 0.9 < want <= 1.0


# Reading features.


def test_a_folder_is_averaged_over_windows_and_tokens(tmp_path):
  rng = np.random.default_rng(0)
  grids = [rng.normal(size=(3, 2, 2, 2, 5)) for _ in range(6)]
  labels = [(i % 3,) for i in range(6)]
  folder = write_features_dir(tmp_path / 'f', grids, labels,
                              classes=['x', 'y', 'z'], pool='tokens',
                              skip={4})
  features = probing.load(folder)
  want = [g.reshape(-1, 5).mean(0) for i, g in enumerate(grids) if i != 4]
  np.testing.assert_allclose(features.features, want, atol=1e-6)
  assert features.labels == [y for i, y in enumerate(labels) if i != 4]
  assert features.classes == ['x', 'y', 'z']
  assert features.left_out == {'no features': 1}
  assert not features.multi_label


def test_an_npz_is_labelled_by_its_listing(tmp_path):
  (tmp_path / 'classes.txt').write_text('cat\ndog\n')
  (tmp_path / 'train.csv').write_text('a.mp4 dog\nb.mp4 cat\nc.mp4 cat\n'
                                      'gone.mp4 dog\n')
  vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
  vectors[2] = np.nan  # c.mp4 failed.
  np.savez(tmp_path / 'f.npz', video_features=vectors,
           paths=np.array([str(tmp_path / 'b.mp4'), 'a.mp4', 'c.mp4',
                           'other.mp4']),
           errors=np.array(['', '', 'not a video', '']))
  features = probing.load(str(tmp_path / 'f.npz'),
                          str(tmp_path / 'train.csv'))
  assert features.paths == ['a.mp4', str(tmp_path / 'b.mp4')]
  np.testing.assert_array_equal(features.features, vectors[[1, 0]])
  assert features.labels == [(1,), (0,)]
  assert features.left_out == {'failed': 1, 'no features': 2,
                               'not in the listing': 1}


# The CLI.


def test_the_cli_prints_the_table(tmp_path, capsys):
  x, labels = blobs(120, 7, 10, seed=0)
  train = write_features_dir(tmp_path / 'train', x[:80, None],
                             [(c,) for c in labels[:80]], skip={3})
  test = write_features_dir(tmp_path / 'test', x[80:, None],
                            [(c,) for c in labels[80:]])
  status, out, err = run_probe([f'--train={train}', f'--test={test}'],
                               capsys)
  assert status == 0, err
  rows = [line.split() for line in out.splitlines()]
  assert rows[0] == ['method', 'metric', 'value', 'n_train', 'n_test']
  assert [r[:2] for r in rows[1:5]] == [
      ['linear', 'top1'], ['linear', 'top5'], ['knn', 'top1'],
      ['knn', 'top5']]
  assert rows[1][2:] == ['1.0000', '79', '40']
  assert 'weight decay' in out
  assert err.strip() == (f'probe: train ({train}): 1 videos left out '
                         '(1 no features).')
  status, out, _ = run_probe([f'--train={train}', f'--test={test}',
                              '--json'], capsys)
  assert status == 0 and json.loads(out)['linear']['top1'] == 1.0


def bad_input_cases(tmp_path):
  x, labels = blobs(40, 2, 6, seed=0)
  good = write_features_dir(tmp_path / 'good', x[:, None],
                            [(c,) for c in labels])
  wide = write_features_dir(tmp_path / 'wide', np.ones((20, 1, 9)),
                            [(i % 2,) for i in range(20)])
  one = write_features_dir(tmp_path / 'one', x[:, None], [(0,)] * 40)
  np.savez(tmp_path / 'f.npz', video_features=x, paths=np.array(
      [f'v{i}.mp4' for i in range(40)]), errors=np.array([''] * 40))
  (tmp_path / 'plain.txt').write_text('x')
  (tmp_path / 'broken.npz').write_text('x')
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'features.json').write_text('{"videos": [')
  return {
      'neither': ([f'--train={tmp_path}/plain.txt', f'--test={good}'],
                  'is neither a features folder'),
      'sizes': ([f'--train={good}', f'--test={wide}'],
                'have 6 dimensions and test'),
      'npz without labels': ([f'--train={tmp_path}/f.npz', f'--test={good}'],
                             'has no labels: pass its listing'),
      'one class': ([f'--train={one}', f'--test={good}'],
                    'have 1 class(es); a probe needs two'),
      'no test': ([f'--train={good}'], 'Pass --train=FEATURES and --test'),
      'broken npz': ([f'--train={tmp_path}/broken.npz', f'--test={good}'],
                     'cannot be read as an .npz'),
      'broken json': ([f'--train={tmp_path}/broken', f'--test={good}'],
                      'features.json is not JSON'),
  }


@pytest.mark.parametrize('case', ['neither', 'sizes', 'npz without labels',
                                  'one class', 'no test', 'broken npz',
                                  'broken json'])
def test_bad_inputs_get_one_line(case, tmp_path, capsys):
  args, message = bad_input_cases(tmp_path)[case]
  status, out, err = run_probe(args, capsys)
  assert status == 2 and not out
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith('probe: error: ') and message in err, err


def test_an_unknown_label_names_its_line(tmp_path, capsys):
  (tmp_path / 'classes.txt').write_text('cat\ndog\n')
  (tmp_path / 'test.csv').write_text('a.mp4 dog\nb.mp4 cow\n')
  np.savez(tmp_path / 'f.npz', video_features=np.ones((2, 3)),
           paths=np.array(['a.mp4', 'b.mp4']), errors=np.array(['', '']))
  status, _, err = run_probe([f'--train={tmp_path}/f.npz',
                              f'--train_labels={tmp_path}/test.csv',
                              f'--test={tmp_path}/f.npz'], capsys)
  assert status == 2 and len(err.strip().splitlines()) == 1
  assert "test.csv:2: unknown label 'cow'" in err


# The demo: a trained model's features against a random model's.


def demo_features(config, params, folder):
  """Class-token features of 512 train and the 256 test synthetic_motion
  videos, written as features folders; returns their paths."""
  from tsformer_jax import evaluation  # pylint: disable=g-import-not-at-top
  from tsformer_jax.datasets import synthetic_motion  # pylint: disable=g-import-not-at-top
  paths = {}
  for split, count in (('train', 512), ('test', 256)):
    source = synthetic_motion.Source(split)
    videos, labels = zip(*(source[i] for i in range(count)), strict=True)
    predictions = evaluation.predict_videos(config, params, videos,
                                            with_features=True)
    paths[split] = write_features_dir(
        folder / split, [p.features[None] for p in predictions],
        [(y,) for y in labels], classes=list(synthetic_motion.CLASSES))
  return paths


def probe_demo(config, params, folder, capsys):
  """The probe CLI's JSON result on `demo_features` of the model."""
  paths = demo_features(config, params, folder)
  status, out, err = run_probe([f'--train={paths["train"]}',
                                f'--test={paths["test"]}', '--json'], capsys)
  assert status == 0, err
  result = json.loads(out)
  print(result)
  return result


def test_trained_demo_features_probe_well(demo_workdir, tmp_path, capsys):
  config, params = tsformer_jax.load_checkpoint(
      str(demo_workdir / 'checkpoints'))
  result = probe_demo(config, params, tmp_path, capsys)
  assert result['linear']['top1'] >= 0.95
  assert result['knn']['top1'] >= 0.95


@pytest.mark.slow
def test_random_model_features_probe_near_chance(tmp_path, capsys):
  config = config_lib.get_config('divided', 'demo')
  params = tsformer_jax.init_params(config, jax.random.key(0))
  result = probe_demo(config, params, tmp_path, capsys)
  # Two classes that only frame order tells apart: chance is 0.5.
  assert result['linear']['top1'] <= 0.7
  assert result['knn']['top1'] <= 0.7


def test_the_feature_files_of_the_trained_demo_probe_well(
    demo_workdir, tmp_path, capsys):
  """End to end as a user runs it: mp4 files and listings, the features
  CLI, then the probe CLI."""
  from tsformer_jax import features  # pylint: disable=g-import-not-at-top
  for split, count in (('train', 96), ('test', 48)):
    assert cli.call(features.main, [
        'features', f'--checkpoint={demo_workdir}/checkpoints',
        f'--videos={write_listing(tmp_path, split, count)}',
        f'--out={tmp_path}/f/{split}', '--stride_frames=16']) == 0
  status, out, err = run_probe([f'--train={tmp_path}/f/train',
                                f'--test={tmp_path}/f/test', '--json'], capsys)
  assert status == 0, err
  result = json.loads(out)
  assert result['linear']['top1'] >= 0.95
  assert result['knn']['top1'] >= 0.95
