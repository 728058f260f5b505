"""The input-pipeline benchmark: its JSON, its table, its CPU accounting."""

import json
import pathlib

import numpy as np
import pytest

from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax.datasets import benchmark
from tsformer_jax.datasets import tfds_builders
from tsformer_jax.datasets import video_writer

from conftest import counting_frames

ROOT = pathlib.Path(__file__).parent.parent
DEMO = f'--config={ROOT}/configs/divided.py:demo'


def _run(capsys, *flags):
  status = cli.call(benchmark.main, ['benchmark', *flags])
  out, err = capsys.readouterr()
  return status, out, err


def test_json_reports_throughput_cpu_and_the_breakdown(capsys):
  status, out, _ = _run(capsys, DEMO, '--config.data.worker_type=thread',
                        '--batches=2', '--warmup=1', '--breakdown_clips=2',
                        '--json')
  assert status == 0
  result = json.loads(out)
  assert (result['clips'], result['batch_size'], result['loader']) == (
      64, 32, 'train')
  assert result['clip_dtype'] == 'float32'  # The original's resize.
  assert result['clip_shape'] == [32, 8, 32, 32, 3]
  assert result['wall_seconds'] > 0 and result['cpu_seconds'] > 0
  assert result['clips_per_second'] == pytest.approx(
      result['clips'] / result['wall_seconds'])
  assert result['clips_per_cpu_second'] == pytest.approx(
      result['clips'] / result['cpu_seconds'])
  assert list(result['breakdown']) == list(benchmark.STAGES)
  assert len(result['load_average']) == 3


def test_eval_loader_and_the_table_with_the_cores_to_feed_a_step(capsys):
  status, out, _ = _run(capsys, DEMO, '--config.data.worker_type=thread',
                        '--loader=eval', '--batches=1', '--warmup=0',
                        '--breakdown_clips=1', '--step_clips_per_second=1000')
  assert status == 0
  lines = out.splitlines()
  assert lines[0].startswith('eval synthetic_motion (files), 2 thread '
                             'workers, batches of 32')
  assert '32 clips in' in lines[1]  # 32 videos x 1 view.
  assert 'clips per CPU-second' in lines[2] and 'decode' in lines[3]
  assert lines[4].endswith('cores feed 1000 clips/s')


def test_bad_arguments_fail_in_one_line(capsys):
  status, _, err = _run(capsys, DEMO, '--batches=0')
  assert status == 2 and err.strip().endswith(
      '--batches must be positive and --warmup not negative.')
  status, _, err = _run(capsys, '--batches=1')
  assert status == 2 and 'Pass --config' in err
  # --mode is main's: the loader is --loader.
  status, _, err = _run(capsys, DEMO, '--mode=eval')
  assert status == 2 and err == (
      'benchmark: error: --mode is not a flag of benchmark (it takes: '
      '--config, --json, and those benchmark --help lists).\n')
  status, _, err = _run(capsys, DEMO, '--loader=test')
  assert status == 2 and err == ('benchmark: error: flag --loader=test: '
                                 'value should be one of <train|eval>\n')


def test_cpu_seconds_count_the_child_processes():
  start = benchmark.cpu_seconds()
  end = dict(start)
  end[-1] = 2.0  # A worker started in between counts whole.
  end[next(iter(start))] += 1.5
  assert benchmark.spent(start, end) == pytest.approx(3.5)


@pytest.mark.slow
@pytest.mark.parametrize('data_format', ['files', 'tfds'])
def test_mp4_and_prepared_datasets_on_worker_processes(tmp_path, capsys,
                                                       data_format):
  data = tmp_path / 'data'
  lines = []
  for i in range(8):
    video_writer.write_mp4(str(data / f'v{i}.mp4'),
                          counting_frames(30, 48, 64) // (1 + i % 2))
    lines.append(f'v{i}.mp4 {i % 4}\n')
  for split in ('train', 'test'):
    (data / f'{split}.csv').write_text(''.join(lines))
  flags = [f'--config={ROOT}/configs/divided.py:tiny,k400',
           f'--config.data.data_dir={data}',
           f'--config.data.format={data_format}',
           f'--config.data.tfds_dir={tmp_path / "tfds"}',
           '--config.data.num_workers=2', '--batches=3', '--json']
  if data_format == 'tfds':
    config = config_lib.get_config('divided', 'tiny,k400')
    config.data.data_dir = str(data)
    tfds_builders.prepare(config, str(tmp_path / 'tfds'), num_workers=2)
    capsys.readouterr()  # TFDS's progress bars.
  for loader in ('train', 'eval'):
    status, out, _ = _run(capsys, *flags, f'--loader={loader}')
    assert status == 0
    result = json.loads(out)
    assert (result['worker_type'], result['num_workers']) == ('process', 2)
    per_batch = 8 if loader == 'train' else 8 * 3  # Eval: 3 crops a video.
    assert result['clips'] == 3 * per_batch
    # The worker processes' CPU time counts: more than this process alone
    # spends on a batch.
    assert result['cpu_seconds'] > 0
    assert np.isfinite(result['clips_per_cpu_second'])
    assert result['breakdown']['decode'] > 0
