"""The benchmark scripts under experiments/ run, on tiny models."""

import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

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


def test_cpu_benchmark_skips_a_framework_whose_first_call_is_too_slow():
  calls = []
  runners = {'jax': lambda: calls.append('jax'),
             'torch': lambda: (calls.append('torch'), time.sleep(0.3))}
  slow = benchmark_cpu.calls_over(runners, max_seconds=0.2)
  assert list(slow) == ['torch'] and 'one call took' in slow['torch']
  assert calls == ['jax', 'torch']


@pytest.mark.slow
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


def _fake_case(scheme, seconds):
  timed = dict(times_s=[seconds], median_s=seconds, spread_s=0.0,
               clips_per_s=1 / seconds, flops_per_s=1e9 / seconds)
  return dict(scheme=scheme, size='small', dtype='float32', batch_size=1,
              mode='forward', flops_per_clip=1e9, jax=timed,
              torch=dict(skipped='not measured here'),
              command=f'python experiments/benchmark_cpu.py --schemes={scheme}')


def test_cpu_benchmark_saves_every_case_and_resumes(tmp_path):
  env = dict(cpu='cpu A', isa_flags=['avx2'], threads=2, jax='1', torch='2',
             transformers='3', python='3.11', xla_flags='',
             glibc_tunables='', load_average=(1.0, 1.0, 1.0))
  ceilings = {'jax float32': dict(n=64, flops_per_s=2e9)}
  cases = [_fake_case('divided', 0.5), _fake_case('joint', 2.0),
           _fake_case('space_only', 1.0)]
  cases[2]['jax'] = dict(skipped=benchmark_cpu.MEMORY_SKIP + '9 GiB, 2 GiB '
                         'available')
  del cases[1]['command']  # As runs before commands were kept.
  text = benchmark_cpu.save_run(str(tmp_path), 'run', env, ceilings, cases)
  assert text == (tmp_path / 'run.md').read_text()
  assert '| divided | small | float32 | 1 | forward | 2 (500 ± 0 ms)' in text
  # 2 GFLOP/s achieved of a 2 GFLOP/s ceiling.
  assert '| 100% | - | 1 |' in text and 'not measured here' in text
  # Each row names the run that measured it.
  assert ('1. `python experiments/benchmark_cpu.py --schemes=divided`\n'
          f'2. {benchmark_cpu.NO_COMMAND}\n'
          '3. `python experiments/benchmark_cpu.py --schemes=space_only`\n'
          ) in text
  assert [line.rsplit('|', 2)[1].strip() for line in text.splitlines()
          if line.startswith('| ') and 'small' in line] == ['1', '2', '3']

  later = dict(env, load_average=(3.0, 3.0, 3.0))
  env2, ceilings2, done = benchmark_cpu.load_run(str(tmp_path), 'run', later)
  assert env2['load_average'] == [1.0, 1.0, 1.0]  # The run's start.
  assert ceilings2 == ceilings
  # The case skipped for memory is kept, and to be tried again.
  divided, joint, space_only = done
  assert joint == ('joint', 'small', 'float32', 1, 'forward')
  assert [benchmark_cpu.finished(case) for case in done.values()] == [
      True, True, False]
  assert done[joint]['jax']['median_s'] == 2.0

  # A resumed run saves every earlier case: selected or not, and also
  # when it stops before an earlier case's turn; a new result replaces the
  # earlier one.
  merged = functools.partial(benchmark_cpu.merged_cases, done=done)
  assert merged([joint], new={}) == [cases[1], cases[0], cases[2]]
  assert merged([space_only, joint, divided], new={}) == cases[::-1]
  again = _fake_case('joint', 3.0)
  assert merged([joint], new={joint: again}) == [again, cases[0], cases[2]]

  with pytest.raises(SystemExit, match=r"cpu \('cpu A', now 'cpu B'\)"):
    benchmark_cpu.load_run(str(tmp_path), 'run', dict(env, cpu='cpu B'))
  with pytest.raises(SystemExit, match='no earlier run'):
    benchmark_cpu.load_run(str(tmp_path), 'other', env)


def _resident_bytes():
  with open('/proc/self/status') as f:
    line = next(line for line in f if line.startswith('VmRSS:'))
  return int(line.split()[1]) * 1024


def test_free_heap_goes_back_to_the_kernel_before_a_case():
  # 200 blocks of 100 kB (under glibc's mmap threshold: on the heap), then a
  # block above them, so that freeing them leaves them to the process.
  blocks = [np.ones(100_000 // 8) for _ in range(200)]
  guard = np.ones(100_000 // 8)
  del blocks
  kept = _resident_bytes()
  benchmark_cpu.release_free_heap()
  assert kept - _resident_bytes() > 10_000_000
  del guard


@pytest.mark.slow
def test_xla_cpu_options_compares_both_kernels(tmp_path):
  result = subprocess.run(
      [sys.executable, 'experiments/xla_cpu_options.py', '--schemes=divided',
       '--size=small', '--depth=1', '--batch_sizes=1', '--modes=forward',
       '--reps=2', f'--out={tmp_path}'], cwd=ROOT, capture_output=True,
      text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = json.loads((tmp_path / 'xla_cpu_options.json').read_text())['rows']
  assert {k: len(v) for k, v in row['times_s'].items()} == {
      'XLA defaults': 2, 'Eigen': 2}
  medians = row['median_s']
  assert row['speedup'] == pytest.approx(
      medians['XLA defaults'] / medians['Eigen'])
  assert f'{row["speedup"]:.2f}x |' in (
      tmp_path / 'xla_cpu_options.md').read_text()


@pytest.mark.slow
def test_attention_products_times_every_form_per_core_count(tmp_path):
  result = subprocess.run(
      [sys.executable, 'experiments/attention_products.py', '--groups=4',
       '--length=16', '--head_dim=8', '--cores=1', '--reps=2',
       f'--out={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
  import attention_products  # pylint: disable=g-import-not-at-top
  rows = json.loads((tmp_path / 'attention_products.json').read_text())[
      'rows']
  assert [r['form'] for r in rows] == list(attention_products.FORMS)
  for r in rows:
    # The child ran bound to one core, PyTorch on one thread.
    assert r['cores'] == 1 and r['torch_threads'] == 1, r
    assert r['xla_kernel'] in ('YNNPACK', 'Eigen')
    assert r['jax_gflops'] > 0 and r['torch_gflops'] > 0
    assert r['speedup'] == pytest.approx(r['jax_gflops'] / r['torch_gflops'])
  text = (tmp_path / 'attention_products.md').read_text()
  assert '| q k^T | `gqd,gkd->gqk` | 1 |' in text
