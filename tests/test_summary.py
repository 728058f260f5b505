"""`summary`: parameters and FLOPs against the paper."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tsformer_jax import config_lib
from tsformer_jax import summary

ROOT = pathlib.Path(__file__).parent.parent

# The paper's inference cost in "TFLOPs": multiply-adds over the 3 test
# views (1 clip x 3 crops), TimeSformer / -HR / -L (Table 2 and Sec. 4.3).
PAPER_TFLOPS = {'base': 0.59, 'hr': 5.11, 'l': 7.14}


@pytest.mark.parametrize('variant', [
    v if v == 'base' else pytest.param(v, marks=pytest.mark.slow)
    for v in sorted(PAPER_TFLOPS)])
def test_flops_match_the_paper(variant):
  result = summary.summarize(config_lib.get_config('divided', variant))
  paper_convention = 3 * result['flops_per_clip'] / 2 / 1e12
  assert abs(paper_convention / PAPER_TFLOPS[variant] - 1) < 0.05
  assert result['params'] > 121e6 and result['temp_bytes'] > 0


@pytest.mark.slow
def test_cli_prints_json():
  out = subprocess.run(
      [sys.executable, '-m', 'tsformer_jax.summary',
       '--config=configs/space_only.py:tiny', '--json'],
      cwd=ROOT, capture_output=True, text=True, check=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(result) == {'params', 'flops_per_clip', 'temp_bytes'}
  assert result['params'] == 81_226 and result['flops_per_clip'] > 1e6


@pytest.mark.slow
def test_train_step_memory_accounts_for_donation_and_batch():
  config = config_lib.get_config('divided', 'tiny')
  one, four = (summary.train_step_memory(config, b) for b in (1, 4))
  params = summary.summarize(config)['params']
  for sizes in (one, four):
    # The new params and momentum are written over the donated ones.
    assert sizes['alias'] == 2 * 4 * params
    assert sizes['peak'] == (sizes['arguments'] + sizes['temp'] +
                             sizes['output'] - sizes['alias'])
  m = config.model
  clip_bytes = 4 * m.num_frames * m.image_size[0] * m.image_size[1] * 3
  label_bytes = 4
  assert four['arguments'] - one['arguments'] == 3 * (clip_bytes +
                                                      label_bytes)
  assert four['temp'] > 2 * one['temp']
