"""Where training starts: the paper's configs from ImageNet ViT-B/16 (as the
original), random weights only when asked for by name.

The ImageNet ViT is a tiny random HF ViT cached under the real id,
`google/vit-base-patch16-224`, in a fake Hub cache (`fake_hub`), offline:
nothing reaches the network.
"""

import sys

import flax
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import config_lib
from tsformer_jax import main
from tsformer_jax import train
from tsformer_jax.datasets import synthetic_motion
from tsformer_jax.datasets import video_writer

from checkpoint_sources import ROOT
from checkpoint_sources import VIT
from checkpoint_sources import save_vits
from checkpoint_sources import torch_nearest_1d
from conftest import apply
from conftest import tiny_params
import fake_hub

IMAGENET = 'google/vit-base-patch16-224'
PAPER = ['base', 'hr', 'l']
REAL = ['', 'kinetics400', 'k600', 'ssv2', 'diving48', 'folder']
SCRATCH_FLAG = '--config.init_from.path=scratch'


@pytest.fixture(scope='module')
def vit(tmp_path_factory):
  """The stand-in ImageNet ViT: `(HF model, Hub cache holding it as
  IMAGENET, its snapshot)`."""
  root = tmp_path_factory.mktemp('vit')
  model, files = save_vits(root)
  cache = root / 'hub'
  snapshot = fake_hub.cache_repo(cache, IMAGENET, [
      files['vit_hf'] / 'config.json', files['vit_hf'] / 'model.safetensors'])
  return model, cache, snapshot


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  """A folder dataset of 2 classes: 4 train and 2 val videos each."""
  root = tmp_path_factory.mktemp('videos')
  for split, count in (('train', 4), ('val', 2)):
    for name in synthetic_motion.CLASSES:
      for i in range(count):
        frames, _ = synthetic_motion.generate('train', i)
        video_writer.write_mp4(str(root / split / name / f'{i}.mp4'), frames)
  return root


def _paper_config(arg='base,folder', **model):
  """The paper's config, its `init_from` untouched, at the stand-in ViT's
  sizes: 4 frames, 2 classes."""
  config = config_lib.get_config('divided', arg)
  config.model.update(
      image_size=(VIT['image_size'],) * 2, patch_size=VIT['patch_size'],
      hidden_size=VIT['hidden_size'], depth=VIT['num_hidden_layers'],
      num_heads=VIT['num_attention_heads'], mlp_dim=VIT['intermediate_size'],
      num_frames=4, num_classes=2)
  config.model.update(model)
  return config


# ----------------------------------------------------------------------------
# The defaults

@pytest.mark.parametrize('dataset', REAL)
@pytest.mark.parametrize('variant', PAPER)
def test_the_paper_configs_start_from_imagenet_vit(variant, dataset):
  config = config_lib.get_config('divided', f'{variant},{dataset}')
  assert config.init_from.to_dict() == dict(
      path=IMAGENET, format='auto', pos_resize='1d')
  assert config_lib.IMAGENET_VIT == IMAGENET


@pytest.mark.parametrize('arg', [
    'tiny', 'demo', 'tiny,kinetics400', 'demo,folder', 'tiny,ssv2',
    'base,synthetic_motion', 'hr,synthetic_motion_videos'])
def test_small_and_synthetic_configs_start_from_random_weights(arg):
  assert config_lib.get_config('divided', arg).init_from.path == 'scratch'


def test_scratch_is_random_weights_without_the_hub(monkeypatch):
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
  config = config_lib.get_config('divided', 'tiny')
  assert checkpoints.init_source(config) is None
  params = checkpoints.init_params_from(config, jax.random.key(0))
  assert jax.tree.all(jax.tree.map(np.array_equal, params, tiny_params()))


@pytest.mark.parametrize('field,value,error,message', [
    ('path', '', ValueError,
     'config.init_from.path is empty: set it to the weights to start from (a '
     "checkpoint or a Hugging Face Hub id; the paper's is "
     f'{IMAGENET}), or train from random weights: {SCRATCH_FLAG}.'),
    ('path', 'missing.npz', FileNotFoundError,
     'config.init_from.path=missing.npz: no such file or directory; to train '
     f'from random weights instead: {SCRATCH_FLAG}.'),
    ('pos_resize', '3d', ValueError,
     "Unknown config.init_from.pos_resize '3d'; valid: ['2d', '1d']."),
    ('format', 'tf', ValueError,
     "Unknown config.init_from.format 'tf'; valid: ['auto', 'orbax', "
     "'hf_timesformer', 'original', 'vit_npz', 'vit_hf', 'vit_timm']."),
])
def test_init_from_fails_in_one_line(tmp_path, monkeypatch, field, value,
                                     error, message):
  monkeypatch.chdir(tmp_path)
  config = config_lib.get_config('divided', 'tiny')
  config.init_from[field] = value
  for call in (checkpoints.init_source,
               lambda c: checkpoints.init_params_from(c, jax.random.key(0))):
    with pytest.raises(error) as e:
      call(config)
    assert str(e.value) == message


# ----------------------------------------------------------------------------
# The paper's initialisation, from the Hub's cache

def _vit_as_ours(sd):
  """The HF ViT file's weights `sd` under our names and layouts, written out
  here from the two layouts: the reference for each weight that the paper's
  initialisation keeps."""
  d, h = VIT['hidden_size'], VIT['num_attention_heads']
  out = {'cls': sd['vit.embeddings.cls_token'],
         'embedding/kernel': sd['vit.embeddings.patch_embeddings.projection.'
                                'weight'].transpose(2, 3, 1, 0),
         'embedding/bias': sd['vit.embeddings.patch_embeddings.projection.'
                              'bias'],
         'norm/scale': sd['vit.layernorm.weight'],
         'norm/bias': sd['vit.layernorm.bias']}
  for i in range(VIT['num_hidden_layers']):
    hf, ours = f'vit.encoder.layer.{i}.', f'block_{i}/'
    qkv = [f'{hf}attention.attention.{n}.' for n in ('query', 'key', 'value')]
    # The time step starts as a copy of the space step (the original copies
    # `attn` into `temporal_attn`, `norm1` into `temporal_norm1`).
    for step in ('space_attention', 'time_attention'):
      out.update({
          f'{ours}{step}/norm/scale': sd[f'{hf}layernorm_before.weight'],
          f'{ours}{step}/norm/bias': sd[f'{hf}layernorm_before.bias'],
          f'{ours}{step}/qkv/kernel': np.stack(
              [sd[n + 'weight'].T.reshape(d, h, d // h) for n in qkv], 1),
          f'{ours}{step}/qkv/bias': np.stack(
              [sd[n + 'bias'].reshape(h, d // h) for n in qkv]),
          f'{ours}{step}/proj/kernel': sd[
              f'{hf}attention.output.dense.weight'].T.reshape(h, d // h, d),
          f'{ours}{step}/proj/bias': sd[f'{hf}attention.output.dense.bias'],
      })
    out.update({
        f'{ours}mlp_norm/scale': sd[f'{hf}layernorm_after.weight'],
        f'{ours}mlp_norm/bias': sd[f'{hf}layernorm_after.bias'],
        f'{ours}mlp/fc1/kernel': sd[f'{hf}intermediate.dense.weight'].T,
        f'{ours}mlp/fc1/bias': sd[f'{hf}intermediate.dense.bias'],
        f'{ours}mlp/fc2/kernel': sd[f'{hf}output.dense.weight'].T,
        f'{ours}mlp/fc2/bias': sd[f'{hf}output.dense.bias'],
    })
  return out


def test_imagenet_init_keeps_all_but_the_head(monkeypatch, vit):
  """At another frame size (64 px: 8 x 8 patches, the ViT's 4 x 4), as HR's
  448 px (28 x 28, the ViT's 14 x 14): every ViT weight but the head, the
  time step a copy of the space step with its output layer at zero, the
  time embedding at zero, the position embedding resized as a flattened
  sequence (each patch's entry 4 times in a row), as the original does."""
  _, cache, snapshot = vit
  fake_hub.point_at(monkeypatch, cache)
  config = _paper_config(image_size=(64, 64))
  assert checkpoints.init_source(config) == str(snapshot)
  params = flax.traverse_util.flatten_dict(
      checkpoints.init_params_from(config, jax.random.key(0)), sep='/')
  sd = safetensors.numpy.load_file(snapshot / 'model.safetensors')

  kept = _vit_as_ours(sd)
  for name, want in kept.items():
    np.testing.assert_array_equal(params[name], want, err_msg=name)
  pos = sd['vit.embeddings.position_embeddings']
  assert params['pos_embedding'].shape == (1, 1 + 64, 64)
  np.testing.assert_array_equal(params['pos_embedding'][:, :1], pos[:, :1])
  np.testing.assert_array_equal(params['pos_embedding'][:, 1:],
                                torch_nearest_1d(pos[:, 1:], 64))
  np.testing.assert_array_equal(params['pos_embedding'][:, 1:],
                                np.repeat(pos[:, 1:], 4, axis=1))
  zero = ['time_embedding'] + [
      f'block_{i}/time_attention/fc/{leaf}'
      for i in range(VIT['num_hidden_layers']) for leaf in ('kernel', 'bias')]
  for name in zero:
    assert not np.any(params[name]), name
  assert params['time_embedding'].shape == (1, 4, 64)
  # The head alone is new, for the video classes (the ViT's has 10).
  assert sorted(set(params) - set(kept) - set(zero)) == [
      'head/bias', 'head/kernel', 'pos_embedding']
  assert params['head/kernel'].shape == (64, 2)
  assert not np.any(params['head/bias'])
  assert 0.01 < float(np.std(params['head/kernel'])) < 0.03


def test_imagenet_init_starts_as_the_image_model(monkeypatch, vit):
  """At the ViT's own frame size, a still clip gives the image model's
  class-token features, through the new head (fp32, atol 1e-4)."""
  model, cache, _ = vit
  fake_hub.point_at(monkeypatch, cache)
  config = _paper_config()
  params = checkpoints.init_params_from(config, jax.random.key(0))
  frames = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(
      np.float32)
  clips = np.repeat(frames[:, None], config.model.num_frames, axis=1)
  with torch.no_grad():
    features = model.vit(torch.from_numpy(frames).permute(0, 3, 1, 2)
                         ).last_hidden_state[:, 0].numpy()
  want = features @ params['head']['kernel'] + params['head']['bias']
  got = apply(tsformer_jax.create_model(config), params, clips)
  np.testing.assert_allclose(got, want, atol=1e-4)


# ----------------------------------------------------------------------------
# The job: it fetches the weights first, and fails before any compute

def _main_error(capsys, *flags):
  capsys.readouterr()
  status = cli.call(main.main, ['main', *flags])
  lines = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(lines) == 1, lines
  return lines[0].removeprefix('main: error: ')


def _no_state(monkeypatch):
  def build(*args, **kwargs):
    pytest.fail('the state was built')
  monkeypatch.setattr(train, 'create_train_state', build)


@pytest.mark.parametrize('hub', ['offline', 'not installed'])
def test_without_the_weights_the_job_stops_before_compute(
    tmp_path, monkeypatch, capsys, videos, hub):
  """The paper's config on your videos, the ViT neither cached nor
  fetchable: one line naming the id, how to fetch it and how to train from
  scratch instead; no state built, no step written."""
  empty = tmp_path / 'empty-cache'
  fake_hub.point_at(monkeypatch, empty)
  if hub == 'not installed':
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
  _no_state(monkeypatch)
  workdir = tmp_path / 'work'
  error = _main_error(
      capsys, f'--config={ROOT}/configs/divided.py:base,folder',
      f'--config.data.data_dir={videos}', '--config.model.num_classes=2',
      f'--workdir={workdir}')
  why = {
      'offline': f'no such file or directory, nor in the Hugging Face cache '
                 f'({empty}), and HF_HUB_OFFLINE is set: download it once '
                 f'online (hf download {IMAGENET}) or pass a local path',
      'not installed': 'no such file or directory; read as a Hugging Face '
                       'Hub id, it needs huggingface_hub: pip install '
                       "'tsformer_jax[hub]'",
  }[hub]
  assert error == (f'config.init_from.path={IMAGENET}: {why}; to train from '
                   f'random weights instead: {SCRATCH_FLAG}.')
  assert not list(workdir.glob('checkpoints/*'))


def test_eval_of_imagenet_weights_alone_stops_before_compute(
    tmp_path, monkeypatch, capsys, videos, vit):
  """--mode=eval with no checkpoint would score the ViT with a new head."""
  fake_hub.point_at(monkeypatch, vit[1])
  _no_state(monkeypatch)
  error = _main_error(
      capsys, f'--config={ROOT}/configs/divided.py:base,folder',
      f'--config.data.data_dir={videos}', '--config.model.num_classes=2',
      f'--workdir={tmp_path}', '--mode=eval')
  assert error == (
      f'--mode=eval found no checkpoint in {tmp_path}/checkpoints and '
      f'config.init_from.path ({IMAGENET}) holds image weights, whose head '
      'is new, so it would evaluate random weights: point --workdir at a '
      'trained run, or set --config.init_from.path to the weights to '
      'evaluate.')


@pytest.mark.slow  # Two short training runs.
def test_a_run_from_imagenet_resumes_without_the_weights(
    tmp_path, monkeypatch, videos, vit):
  """A run starts from the cached ViT; resumed with the cache gone, it
  reads no initial weights (the checkpoint holds them all)."""
  fake_hub.point_at(monkeypatch, vit[1])
  config = _paper_config()
  config.data.data_dir = str(videos)
  config.data.update(num_workers=2, worker_type='thread', test_num_crops=1)
  config.update(batch_size=4, grad_accum_steps=1, eval_batch_size=4,
                num_train_steps=1, checkpoint_every_steps=1)
  workdir = tmp_path / 'work'
  assert train.train_and_evaluate(config, str(workdir),
                                  mode='train')['step'] == 1
  fake_hub.point_at(monkeypatch, tmp_path / 'empty-cache')
  config.num_train_steps = 2
  assert train.train_and_evaluate(config, str(workdir),
                                  mode='train')['step'] == 2
