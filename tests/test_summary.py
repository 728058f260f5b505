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
