"""The Colab notebooks: committed with cleared outputs, and they run top to
bottom in smoke mode (`TSFORMER_NOTEBOOK_SMOKE=1`) on the CPU."""

import json
import os
import pathlib
import re

from nbclient import NotebookClient
import nbformat
import pytest

from tsformer_jax import checkpoints
from tsformer_jax.datasets import synthetic_motion

from conftest import predicted_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / 'notebooks'
NAMES = ('quickstart.ipynb', 'finetune.ipynb')
CELL_TIMEOUT_S = 300
SMOKE_STEPS = 4  # The settings cells' num_train_steps in smoke mode.
LABEL = '|'.join(synthetic_motion.CLASSES)


@pytest.mark.parametrize('name', NAMES)
def test_committed_with_cleared_outputs(name):
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(notebook)
  assert notebook.metadata.kernelspec.name == 'python3'
  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert code
  for cell in code:
    assert cell.outputs == [], cell.source[:60]
    assert cell.execution_count is None, cell.source[:60]


def _execute(name: str, workdir: pathlib.Path,
             monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
  """Runs the notebook in a fresh python3 kernel in `workdir`, in smoke
  mode, importing this checkout; raises on the first failing cell."""
  monkeypatch.setenv('TSFORMER_NOTEBOOK_SMOKE', '1')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  # Nothing lands in the home directory's caches.
  monkeypatch.setenv('XDG_CACHE_HOME', str(workdir / 'cache'))
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                 resources={'metadata': {'path': str(workdir)}}).execute()
  return notebook


def _cell(notebook: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
  [cell] = [c for c in notebook.cells if tag in c.metadata.get('tags', ())]
  return cell


def _stdout(cell: nbformat.NotebookNode) -> str:
  return ''.join(o.text for o in cell.outputs
                 if o.output_type == 'stream' and o.name == 'stdout')


def _results(path: pathlib.Path) -> dict:
  results = json.loads(path.read_text())
  assert results['step'] == SMOKE_STEPS
  assert results['skipped_videos'] == 0
  assert results == pytest.approx(
      results | predicted_metrics(path.parent), abs=1e-6)
  return results


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
  notebook = _execute('quickstart.ipynb', tmp_path, monkeypatch)
  _results(tmp_path / 'quickstart_run' / 'results.json')

  # One line per video: its label, the top probability (at least 1/2 of two
  # classes, printed to 3 decimals) and the true label.
  lines = _stdout(_cell(notebook, 'predict')).splitlines()
  assert len(lines) == 4
  for index, line in enumerate(lines):
    match = re.fullmatch(rf'test_{index}\.mp4: ({LABEL}) \((\d\.\d{{3}})\), '
                         rf'true: ({LABEL})', line)
    assert match, line
    assert 0.5 <= float(match[2]) <= 1.0
    _, label = synthetic_motion.generate('test', index)
    assert match[3] == synthetic_motion.CLASSES[label]

  cell = _cell(notebook, 'visualize')
  assert re.match(rf'test_0\.mp4: ({LABEL}) \(\d\.\d{{3}}\)\n',
                  _stdout(cell))
  shown = [next(k for k in o.data if k.startswith('image/'))
           for o in cell.outputs if o.output_type == 'display_data']
  assert shown == ['image/png', 'image/gif', 'image/png']
  rollout = tmp_path / 'quickstart_rollout'
  for name, magic in (('rollout_frames.png', b'\x89PNG'),
                      ('rollout.gif', b'GIF8'),
                      ('temporal_importance.png', b'\x89PNG')):
    assert (rollout / name).read_bytes()[:4] == magic, name

  # The notebook itself asserts the bound; this checks that it ran.
  difference = re.search(r'largest logit difference: (\S+)',
                         _stdout(_cell(notebook, 'convert')))
  assert difference and float(difference[1]) < 1e-4


@pytest.mark.slow
def test_finetune_runs(tmp_path, monkeypatch):
  notebook = _execute('finetune.ipynb', tmp_path, monkeypatch)
  results = _results(tmp_path / 'finetune_run' / 'results.json')

  # The stand-in has 4 frames and 10 classes, the (one-block) demo model 8
  # and 2: the time embedding is resampled (nearest: each frame twice), the
  # head is new, the other 26 arrays are kept.
  text = _stdout(_cell(notebook, 'init_from'))
  assert 'kept unchanged: 26 of 29 arrays\n' in text
  assert 'head/bias: (10,) -> (2,)\n' in text
  assert 'head/kernel: (64, 10) -> (64, 2)\n' in text
  assert 'time_embedding: (1, 4, 64) -> (1, 8, 64)\n' in text
  assert ("time_embedding: the checkpoint's frame for each frame: "
          '[0, 0, 1, 1, 2, 2, 3, 3]\n') in text

  # predict_videos over the 32 test videos gives evaluation's top-1.
  match = re.search(r'top-1 of predict over (\d+) videos: (\S+); '
                    r'train_and_evaluate: (\S+)\n',
                    _stdout(_cell(notebook, 'evaluate')))
  assert match
  assert int(match[1]) == 32
  assert float(match[2]) == float(match[3]) == round(results['eval_top1'], 4)

  config, params = checkpoints.load_checkpoint(
      str(tmp_path / 'finetune_run' / 'checkpoints'))
  assert config.init_from.path == str(tmp_path / 'pretrained_standin')
  assert config.model.num_frames == 8 and config.model.num_classes == 2
  # The class folders' names, carried by the checkpoint and exported.
  assert config.data.class_names == ('blue_then_red', 'red_then_blue')
  text = _stdout(_cell(notebook, 'export'))
  assert "id2label: {0: 'blue_then_red', 1: 'red_then_blue'}" in text
  difference = re.search(r'largest logit difference, PyTorch vs ours: (\S+)',
                         text)
  assert difference and float(difference[1]) < 1e-4
  assert config.model.depth == 1  # Smoke mode's model.
  assert params['head']['kernel'].shape == (64, 2)
