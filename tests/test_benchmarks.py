"""The benchmark scripts under experiments/ run, on tiny models."""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tsformer_jax

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import benchmark_cpu  # noqa: E402  pylint: disable=g-import-not-at-top
import gpu_benchmark  # noqa: E402  pylint: disable=g-import-not-at-top
import train_step_cost  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.slow
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


def test_benchmark_step_updates_as_torch_sgd_with_its_arguments():
  """The step's optimizer (`train.create_optimizer`) and the PyTorch rows'
  `torch.optim.SGD(**torch_sgd(config))` make the same updates."""
  import torch  # pylint: disable=g-import-not-at-top
  config = tiny_config('divided')
  # Rates large enough that a dropped term (decay, Nesterov) shows.
  config.optimizer.update(learning_rate=0.5, weight_decay=0.1)
  _, tx = train_step_cost.train_step(config)
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  grads = [rng.normal(size=w.shape).astype(np.float32) for _ in range(3)]
  params = {'w': w}
  state = tx.init(params)
  theirs = torch.nn.Parameter(torch.from_numpy(w.copy()))
  opt = torch.optim.SGD([theirs], **train_step_cost.torch_sgd(config))
  for g in grads:
    updates, state = tx.update({'w': g}, state, params)
    params = {'w': params['w'] + np.asarray(updates['w'])}
    theirs.grad = torch.from_numpy(g)
    opt.step()
  assert not np.allclose(params['w'], w)
  np.testing.assert_allclose(params['w'], theirs.detach().numpy(),
                             rtol=0, atol=1e-6)


def test_torch_sgd_refuses_an_update_it_cannot_state():
  config = tiny_config('divided')
  config.optimizer.name = 'adamw'
  with pytest.raises(ValueError, match="optimizer.name='adamw'"):
    train_step_cost.torch_sgd(config)


@pytest.mark.slow
def test_train_step_memory_accounts_for_donation_and_batch():
  config = tiny_config('divided')
  one, four = (train_step_cost.train_step_memory(config, b) for b in (1, 4))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      jax.eval_shape(lambda: tsformer_jax.init_params(
          config, jax.random.key(0)))))
  for sizes in (one, four):
    # The new params and momentum are written over the donated ones, and
    # the schedule's step count (int32).
    assert sizes['alias'] == 2 * 4 * params + 4
    assert sizes['peak'] == (sizes['arguments'] + sizes['temp'] +
                             sizes['output'] - sizes['alias'])
  m = config.model
  clip_bytes = 4 * m.num_frames * m.image_size[0] * m.image_size[1] * 3
  label_bytes = 4
  assert four['arguments'] - one['arguments'] == 3 * (clip_bytes +
                                                      label_bytes)
  assert four['temp'] > 2 * one['temp']


def test_cpu_benchmark_skips_a_framework_whose_first_call_is_too_slow():
  calls = []
  runners = {'jax': lambda: calls.append('jax'),
             'torch': lambda: (calls.append('torch'), time.sleep(0.3))}
  slow = benchmark_cpu.calls_over(runners, max_seconds=0.2)
  assert list(slow) == ['torch'] and 'one call took' in slow['torch']
  assert calls == ['jax', 'torch']


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_any_backend(tmp_path):
  """Every plan's rows, each in its own process, tiny: all of them run."""
  result = subprocess.run(
      [sys.executable, 'experiments/gpu_benchmark.py', '--smoke',
       f'--out={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  (json_file,) = tmp_path.glob('gpu_*.json')
  run = json.loads(json_file.read_text())
  rows = run['rows']
  expected = gpu_benchmark.smoke_rows(
      [r for plan in gpu_benchmark.plans().values() for r in plan])
  assert ([gpu_benchmark.row_key(r) for r in rows] ==
          [gpu_benchmark.row_key(r) for r in expected])
  assert run['forward_flops_per_clip'] > 0
  for r in rows:
    assert r['status'] == 'ok', r
    if r['kind'] in ('jax', 'torch'):
      assert np.isfinite(r['clips_per_sec']) and r['clips_per_sec'] > 0, r
      assert np.isfinite(r['first_loss']), r
    if r['kind'] == 'memory':
      assert r['peak_gib'] > 0 and r['remat'] in ('full', 'none', 'dots'), r
  # Our variants start from the same parameters, clips and key.
  jax_losses = {r['first_loss'] for r in rows
                if r['kind'] == 'jax' and r['batch_size'] == 2}
  assert max(jax_losses) - min(jax_losses) < 1e-2, jax_losses
  text = (tmp_path / json_file.name.replace('.json', '.md')).read_text()
  assert 'HF PyTorch (torch.compile default, SDPA)' in text
  assert '## Training-step memory' in text and '## Profiles' in text
  assert len(list(tmp_path.glob('gpu_profile_*.md'))) == 2


def test_gpu_benchmark_plans_hold_the_rows_the_gpu_session_needs():
  plans = gpu_benchmark.plans()
  assert {'quick', 'full', 'anchor', 'variants', 'memory', 'profile'} <= set(
      plans)
  for name, rows in plans.items():
    keys = [gpu_benchmark.row_key(r) for r in rows]
    assert len(keys) == len(set(keys)), name
    for r in rows:
      assert r.get('flags', 'default') in gpu_benchmark.XLA_FLAG_SETS
  full = {gpu_benchmark.row_key(r): r for r in plans['full']}
  assert 'HF PyTorch (torch.compile default, SDPA) b32' in full
  assert 'HF PyTorch (torch.compile max-autotune, SDPA) b32' in full
  assert 'tsformer_jax (pallas, remat none) b32' in full
  assert 'tsformer_jax (xla, remat dots) b64' in full
  assert 'tsformer_jax (xla, remat none, XLA flags lhs) b32' in full
  (l_memory,) = [r for r in plans['full'] if r['kind'] == 'memory']
  assert (l_memory['variant'], l_memory['remat'],
          l_memory['batch_size']) == ('l', 'full', 1)
  # The quick plan comes first in the full one: a cut run still has it.
  quick = [gpu_benchmark.row_key(r) for r in plans['quick']]
  assert set(quick) <= set(list(full)[:len(quick) + 2])


def test_gpu_benchmark_sdpa_attention_equals_hugging_face_attention():
  import torch  # pylint: disable=g-import-not-at-top
  config = tiny_config('divided')
  hf = gpu_benchmark.hf_model(config, 'hf').eval()
  sdpa = gpu_benchmark.hf_model(config, 'sdpa').eval()
  sdpa.load_state_dict(hf.state_dict())
  # Our drop path schedule: 0 at the first block, ours at the last.
  rates = [getattr(layer.drop_path, 'drop_prob', 0.0)
           for layer in hf.timesformer.encoder.layer]
  assert rates == pytest.approx([0.0, config.model.drop_path])
  m = config.model
  pixels = torch.randn(2, m.num_frames, 3, *m.image_size)
  outs = []
  for model in (hf, sdpa):
    logits = model(pixels).logits
    logits.square().sum().backward()
    outs.append((logits.detach(),
                 model.timesformer.encoder.layer[0].attention.attention
                 .qkv.weight.grad.clone()))
  np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-5)
  np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-5)


def test_gpu_benchmark_tables_record_rows_that_failed_or_ran_out(tmp_path):
  meta = dict(device='Some GPU', jax='1', torch='torch 2', python='3.12',
              peak_bf16=1e15, forward_flops_per_clip=1e11,
              command='python experiments/gpu_benchmark.py --plan=quick')
  ok = gpu_benchmark.finish_row(
      gpu_benchmark.jax_row(32), dict(times_s=[0.2, 0.1, 0.1], status='ok',
                                      first_loss=6.0, memory_gib=3.0),
      1e11, 1e15)
  assert ok['clips_per_sec'] == pytest.approx(320)
  assert ok['mfu'] == pytest.approx(3 * 1e11 * 320 / 1e15)
  rows = [ok,
          dict(gpu_benchmark.torch_row(32, 'max-autotune'),
               status='timed out after 420 s'),
          dict(gpu_benchmark.memory_row(), status='failed: OOM'),
          dict(gpu_benchmark.profile_row(32), status='not run: out of time')]
  name = gpu_benchmark.write_tables(str(tmp_path), meta, rows)
  text = open(name + '.md').read()
  assert name.endswith('gpu_Some_GPU')
  assert ('| tsformer_jax (xla, remat none) | 32 | 100.0 | 100.0 | 320.0 |'
          in text)
  assert 'torch.compile max-autotune, SDPA) | 32 | - |' in text
  assert 'timed out after 420 s' in text and 'failed: OOM' in text
  assert 'not run: out of time' in text
  assert json.loads(open(name + '.json').read())['rows'][0]['mfu'] > 0


def test_gpu_benchmark_resumes_the_rows_an_earlier_run_measured(tmp_path):
  rows = gpu_benchmark.plans()['quick']
  earlier = [dict(rows[0], status='ok', clips_per_sec=200.0),
             dict(rows[1], status='timed out after 300 s'),
             dict(gpu_benchmark.jax_row(64), status='ok')]
  path = tmp_path / 'gpu_H200.json'
  path.write_text(json.dumps(dict(device='H200', rows=earlier)))
  kept = gpu_benchmark.resumed_rows(str(path), 'H200', rows)
  # Only finished rows of this plan: the timed-out one runs again.
  assert kept == earlier[:1]
  assert gpu_benchmark.resumed_rows(str(path), 'H100', rows) == []
  assert gpu_benchmark.resumed_rows(None, 'H200', rows) == []


@pytest.mark.slow
def test_gpu_benchmark_rows_that_fail_or_time_out_are_recorded(tmp_path):
  args = argparse.Namespace(steps=1, out=str(tmp_path))
  bad = dict(gpu_benchmark.jax_row(2, impl='no_such_kernel'),
             variant='tiny', smoke=True)
  slow = dict(gpu_benchmark.memory_row(), variant='tiny', smoke=True)
  failed = gpu_benchmark.launch(bad, args, 'cpu', 120)
  timed_out = gpu_benchmark.launch(slow, args, 'cpu', 0.5)
  assert failed.result()['status'].startswith('failed: ValueError: Unknown '
                                              'attention implementation')
  assert timed_out.result()['status'] == 'timed out after 0 s'


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
