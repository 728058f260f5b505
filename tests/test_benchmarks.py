"""The benchmark scripts under experiments/ run, on tiny models."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import benchmark_cpu  # noqa: E402  pylint: disable=g-import-not-at-top


def test_cpu_benchmark_steps_both_frameworks_alike():
  config = tiny_config('divided', drop_path=0.0)
  jax_run, flops, temp = benchmark_cpu.jax_runner(config, 2, 'train')
  torch_run = benchmark_cpu.torch_runner(config, 2, 'train')
  assert flops > 0 and temp > 0
  calls = []
  runners = {name: (lambda run=run, name=name: (calls.append(name), run()))
             for name, run in (('jax', jax_run), ('torch', torch_run))}
  times = benchmark_cpu.interleaved_times(runners, reps=2, warmup=1)
  assert {k: len(v) for k, v in times.items()} == {'jax': 2, 'torch': 2}
  assert all(t > 0 for v in times.values() for t in v)
  # Every timed call follows an untimed call of its own framework.
  assert calls == ['jax', 'jax', 'torch', 'torch'] * 2


def test_gpu_benchmark_smoke_runs_on_any_backend(tmp_path):
  result = subprocess.run(
      [sys.executable, 'experiments/gpu_benchmark.py', '--smoke',
       f'--out={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  (json_file,) = tmp_path.glob('gpu_*.json')
  rows = json.loads(json_file.read_text())['rows']
  assert rows
  for r in rows:
    assert np.isfinite(r['clips_per_sec']) and r['clips_per_sec'] > 0, r
