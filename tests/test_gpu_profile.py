"""experiments/gpu_profile.py: HLO names, kinds of op, trace events, and a
real trace of a tiny training step on the CPU."""

import json
import os
import sys

import pytest

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import gpu_profile  # noqa: E402  pylint: disable=g-import-not-at-top

FWD = 'jit(step)/jvp(TimeSformer)/'
BWD = 'jit(step)/transpose(jvp(TimeSformer))/'


def _meta(op_name):
  return f'metadata={{op_name="{op_name}"}}'


# As XLA prints a compiled GPU module (shortened).
HLO = '\n'.join([
    'HloModule jit_step, entry_computation_layout={()->()}',
    '',
    '%fused_dot (p0: bf16[8,64], p1: bf16[64,64]) -> bf16[8,64] {',
    '  %p0 = bf16[8,64]{1,0} parameter(0)',
    '  %p1 = bf16[64,64]{1,0} parameter(1)',
    '  ROOT %dot.1 = bf16[8,64]{1,0} dot(%p0, %p1), '
    'lhs_contracting_dims={1}, rhs_contracting_dims={0}',
    '}',
    '',
    '%fused_transpose (p0: bf16[8,64]) -> bf16[64,8] {',
    '  %p0 = bf16[8,64]{1,0} parameter(0)',
    '  %convert.2 = f32[8,64]{1,0} convert(%p0)',
    '  ROOT %transpose.3 = f32[64,8]{0,1} transpose(%convert.2), '
    f'dimensions={{1,0}}, {_meta(FWD + "block_0/time_attention/transpose")}',
    '}',
    '',
    '%fused_softmax (p0: f32[8,8]) -> f32[8,8] {',
    '  %p0 = f32[8,8]{1,0} parameter(0)',
    '  %c = f32[] constant(-inf)',
    '  %reduce.4 = f32[8]{0} reduce(%p0, %c), dimensions={1}, to_apply=%max',
    '  %exponential.5 = f32[8,8]{1,0} exponential(%p0)',
    '  ROOT %divide.6 = f32[8,8]{1,0} divide(%exponential.5, '
    '%exponential.5)',
    '}',
    '',
    '%fused_norm (p0: f32[8,64]) -> f32[8,64] {',
    '  %p0 = f32[8,64]{1,0} parameter(0)',
    '  ROOT %rsqrt.7 = f32[8,64]{1,0} rsqrt(%p0), '
    f'{_meta(FWD + "block_0/mlp_norm/rsqrt")}',
    '}',
    '',
    'ENTRY %main.9 (a: bf16[8,64], b: bf16[64,64]) -> (bf16[8,64]) {',
    '  %a = bf16[8,64]{1,0} parameter(0)',
    '  %b = bf16[64,64]{1,0} parameter(1)',
    '  %gemm_fusion_dot.1 = bf16[8,64]{1,0} fusion(%a, %b), kind=kCustom, '
    f'calls=%fused_dot, {_meta(BWD + "block_0/mlp/fc1/dot_general")}, '
    'backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}',
    '  %custom-call.2 = (bf16[8,64]{1,0}, s8[0]{0}) custom-call(%a, %b), '
    'custom_call_target="__cublas$gemm", '
    f'{_meta(FWD + "block_0/time_attention/qkv/dot_general")}',
    '  %loop_transpose_fusion = f32[64,8]{0,1} fusion(%a), kind=kLoop, '
    'calls=%fused_transpose',
    '  %input_softmax_fusion.3 = f32[8,8]{1,0} fusion(%a), kind=kInput, '
    f'calls=%fused_softmax, {_meta(BWD + "block_1/space_attention/vmap()")}',
    '  %input_norm_fusion = f32[8,64]{1,0} fusion(%a), kind=kInput, '
    f'calls=%fused_norm, {_meta(FWD + "block_0/mlp_norm/reduce_sum")}',
    '  %loop_add_fusion.4 = f32[64,64]{1,0} fusion(%b), kind=kLoop, '
    f'calls=%fused_norm, {_meta("jit(step)/add")}',
    '  %custom-call.5 = bf16[8,64]{1,0} custom-call(%a), '
    'custom_call_target="__gpu$xla.gpu.triton", '
    f'{_meta(FWD + "block_0/time_attention/pallas_call")}',
    '  ROOT %tuple = (bf16[8,64]{1,0}) tuple(%a)',
    '}',
])


def _classified(name, hlo_op=None):
  index = gpu_profile.hlo_index(HLO)
  event = dict(name=name, args={'hlo_op': hlo_op} if hlo_op else {})
  op = gpu_profile._op_for(event, index)
  return gpu_profile.classify(name, op), gpu_profile.part(op)


def test_hlo_index_reads_ops_name_stacks_and_targets():
  index = gpu_profile.hlo_index(HLO)
  gemm = index['gemm_fusion_dot.1']
  assert gemm['opcode'] == 'fusion' and 'dot' in gemm['ops']
  assert '__triton_gemm' in gemm['target']
  # Kernels are named after their HLO instruction with '.' as '_'.
  assert index['gemm_fusion_dot_1'] is gemm
  assert index['custom-call.2']['target'] == '__cublas$gemm'
  # A fusion without a name stack takes its fused computation's.
  assert index['loop_transpose_fusion']['op_name'].endswith(
      'time_attention/transpose')


@pytest.mark.parametrize('name,hlo_op,kind,where', [
    ('gemm_fusion_dot_1', None, 'matmul', ('MLP', 'backward')),
    ('sm90_xmma_gemm_bf16bf16_bf16f32', 'custom-call.2', 'matmul',
     ('attention linear layers', 'forward')),
    ('loop_transpose_fusion', None, 'layout',
     ('time attention (core)', 'forward')),
    ('input_softmax_fusion_3', None, 'attention',
     ('space attention (core)', 'backward')),
    ('input_norm_fusion', None, 'norms and elementwise',
     ('layer norms', 'forward')),
    ('loop_add_fusion_4', None, 'optimizer', ('optimizer', '-')),
    ('tsformer_temporal_attention_fwd', 'custom-call.5', 'attention',
     ('time attention (core)', 'forward')),
    # Kernels the HLO does not name: by their own names.
    ('nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT', None, 'matmul',
     ('unknown', '-')),
    ('Memcpy DtoD (Device -> Device)', None, 'layout', ('unknown', '-')),
    ('some_kernel', None, 'other', ('unknown', '-')),
])
def test_every_kernel_gets_one_kind_and_part(name, hlo_op, kind, where):
  assert _classified(name, hlo_op) == (kind, where)


def _event(pid, tid, ts, dur, name, **args):
  return dict(ph='X', pid=pid, tid=tid, ts=ts, dur=dur, name=name, args=args)


def test_kernel_events_take_a_device_s_streams_only():
  processes = {1: '/host:CPU', 2: '/device:GPU:0'}
  threads = {(2, 10): 'Stream #13(Compute)', (2, 11): 'XLA Ops',
             (1, 5): 'python'}
  events = [
      _event(2, 10, 0, 5, 'gemm_fusion_dot_1', hlo_module='jit_step(42)',
             hlo_op='gemm_fusion_dot.1'),
      _event(2, 10, 6, 2, 'loop_add_fusion_4', hlo_module='jit_step(42)',
             hlo_op='loop_add_fusion.4'),
      _event(2, 10, 9, 1, 'other_module_kernel', hlo_module='jit_init(7)'),
      # The derived line repeats the kernels: not counted again.
      _event(2, 11, 0, 5, 'gemm_fusion_dot.1'),
      _event(1, 5, 0, 50, 'ThunkExecutor::Execute', hlo_op='x'),
  ]
  chosen = gpu_profile.kernel_events(events, processes, threads, 'jit_step')
  assert [e['name'] for e in chosen] == ['gemm_fusion_dot_1',
                                         'loop_add_fusion_4']
  summary = gpu_profile.summarize(chosen, gpu_profile.hlo_index(HLO),
                                  steps=1, step_wall_s=0.01)
  kinds = {r['kind']: r for r in summary['kinds']}
  assert kinds['matmul']['ms'] == pytest.approx(0.005)
  assert kinds['optimizer']['share'] == pytest.approx(2 / 7)
  assert summary['wall_ms_per_step'] == pytest.approx(10)
  assert summary['top'][0]['kernel'] == 'gemm_fusion_dot_1'


def test_kernel_events_on_a_cpu_count_the_innermost_thunks():
  processes = {1: '/host:CPU'}
  events = [_event(1, 5, 0, 10, 'while.1', hlo_op='while.1',
                   hlo_module='jit_step'),
            _event(1, 5, 1, 4, 'fusion.2', hlo_op='fusion.2',
                   hlo_module='jit_step'),
            _event(1, 5, 6, 3, 'fusion.3', hlo_op='fusion.3',
                   hlo_module='jit_step'),
            _event(1, 6, 0, 2, 'fusion.4', hlo_op='fusion.4',
                   hlo_module='jit_step'),
            _event(1, 5, 20, 1, 'PjitFunction', step_num='0')]
  chosen = gpu_profile.kernel_events(events, processes, {}, 'jit_step')
  assert sorted(e['name'] for e in chosen) == ['fusion.2', 'fusion.3',
                                                'fusion.4']


@pytest.mark.slow
def test_profile_of_a_tiny_training_step_on_the_cpu(tmp_path):
  config = tiny_config('divided')
  config.model.dtype = 'bfloat16'
  config.model.attention_impl = 'xla'
  result = gpu_profile.profile(config, 2, 2, str(tmp_path), 'a command',
                               logdir=str(tmp_path / 'trace'))
  assert result['trace'].endswith('trace.json.gz')
  kinds = {r['kind']: r for r in result['kinds']}
  assert sum(r['share'] for r in kinds.values()) == pytest.approx(1)
  for kind in ('matmul', 'attention', 'norms and elementwise', 'optimizer'):
    assert kinds[kind]['share'] > 0, kind
  # Every thunk of the step is one the HLO names.
  assert kinds['other']['share'] == 0
  parts = {r['part'] for r in result['parts']}
  assert {'time attention (core)', 'space attention (core)', 'MLP',
          'optimizer'} <= parts
  assert result['wall_ms_per_step'] > 0 and result['kernel_ms_per_step'] > 0
  (md,) = tmp_path.glob('gpu_profile_*.md')
  text = md.read_text()
  assert '| kind | ms per step | share | kernels per step |' in text
  assert '`a command`' in text
  saved = json.loads(md.with_suffix('.json').read_text())
  assert saved['kinds'] == result['kinds']
