"""Checkpoints: every format in, orbax out, nothing pickled ever run.

All checkpoints are built here from small random models: Hugging Face
TimeSformers and ViTs (PyTorch, CPU), an original-layout `.pyth` from a torch
model written below from the original code's equations, and ViT `.npz` and
timm files derived from the HF ViT by this file's own name mapping.
"""

import json
import math
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from safetensors.torch import save_file
import torch
from torch import nn
import torch.nn.functional as F
from transformers import TimesformerConfig
from transformers import TimesformerForVideoClassification
from transformers import ViTConfig
from transformers import ViTForImageClassification

import tsformer_jax
from tsformer_jax import attention
from tsformer_jax import checkpoints
from tsformer_jax import config_lib
from tsformer_jax import convert
from tsformer_jax import model as model_lib
from tsformer_jax import tensor_io

from conftest import apply
from conftest import hf_logits
from conftest import random_clips
from conftest import tiny_config

ROOT = pathlib.Path(__file__).parent.parent
ATOL = 1e-4  # float32 logits
SCHEMES = sorted(attention.SCHEMES)
# What the original TimeSformer calls our three torch schemes.
ORIGINAL_TYPES = {v: k for k, v in checkpoints.HF_ATTENTION_TYPES.items()}


def _randomize(module, seed):
  """Every parameter redrawn, so zero-initialised ones count as well."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0.0, 0.1)
  return module.eval()


def _cli(*args):
  """`python -m tsformer_jax.convert ARGS`, in this process."""
  assert convert.main(['convert', *map(str, args)]) == 0


def _config_file(scheme, variant='tiny'):
  return f'--config={ROOT / "configs" / scheme}.py:{variant}'


def _random_params(config, seed=0):
  """Random float32 params of `config`'s shapes, without compiling init."""
  shapes = jax.eval_shape(
      lambda: tsformer_jax.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def _items(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _items(value, prefix + (key,))
    else:
      yield prefix + (key,), value


# ----------------------------------------------------------------------------
# Hugging Face TimeSformer

def _hf_timesformer(seed, **kwargs):
  return _randomize(
      TimesformerForVideoClassification(TimesformerConfig(**kwargs)), seed)


def _save_hf(model, directory, weights):
  """`save_pretrained`, then `.bin` weights in place of safetensors if asked
  (transformers 5 writes safetensors only; older releases wrote this)."""
  model.save_pretrained(directory)
  if weights != 'safetensors':
    os.remove(directory / 'model.safetensors')
    torch.save(model.state_dict(), directory / 'pytorch_model.bin',
               _use_new_zipfile_serialization=weights == 'bin')
  return directory


HF_CASES = [
    # attention_type, frames, image, patch, width, depth, heads, classes,
    # weights file
    ('divided_space_time', 3, 32, 8, 32, 2, 2, 5, 'safetensors'),
    ('divided_space_time', 2, 48, 16, 48, 1, 4, 7, 'bin'),
    ('joint_space_time', 3, 32, 8, 32, 2, 2, 5, 'safetensors'),
    ('joint_space_time', 5, 32, 16, 64, 1, 8, 4, 'legacy_bin'),
    ('space_only', 3, 32, 8, 32, 2, 2, 5, 'bin'),
    ('space_only', 2, 48, 16, 48, 2, 3, 6, 'safetensors'),
]


@pytest.mark.parametrize(
    'attention_type,frames,image,patch,width,depth,heads,classes,weights',
    HF_CASES)
def test_hf_timesformer_through_cli_matches_pytorch(
    tmp_path, attention_type, frames, image, patch, width, depth, heads,
    classes, weights):
  hf = _hf_timesformer(frames + depth, attention_type=attention_type,
                       num_frames=frames, image_size=image, patch_size=patch,
                       hidden_size=width, num_hidden_layers=depth,
                       num_attention_heads=heads,
                       intermediate_size=3 * width, num_labels=classes)
  src = _save_hf(hf, tmp_path / 'hf', weights)
  assert checkpoints.detect_format(src) == 'hf_timesformer'
  _cli(src, tmp_path / 'out')
  config, params = tsformer_jax.load_checkpoint(tmp_path / 'out')
  assert config.model.attention == checkpoints.HF_ATTENTION_TYPES[
      attention_type]
  assert (config.model.num_frames, config.model.num_heads) == (frames, heads)
  clips = random_clips(config, seed=frames)
  ours = apply(tsformer_jax.create_model(config), params, clips)
  want = hf_logits(hf, clips)
  assert ours.shape == want.shape == (2, classes)
  assert want.std() > 0.05  # Logits spread far beyond the tolerance.
  print(f'max |logit difference| {attention_type} {frames}x{image}: '
        f'{np.abs(ours - want).max():.2e}')
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------
# The original implementation, rebuilt in torch from its equations
#
# Tokens run in the original's order: the class token, then the patches
# `(h w t)`, patch position major and time fastest. Module names are the
# original's, so `state_dict()` is the layout of its `.pyth` files.

class _Attention(nn.Module):
  """softmax(q k^T / sqrt(Dh)) v over [B, L, D], q, k, v from one Linear."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, length, d = x.shape
    q, k, v = self.qkv(x).reshape(b, length, 3, self.heads,
                                  d // self.heads).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(b, length, d))


class _Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
  """A block; divided: time within each position, then space per frame."""

  def __init__(self, dim, heads, hidden, scheme):
    super().__init__()
    self.scheme = scheme
    self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
    if scheme == 'divided':
      self.temporal_norm1 = nn.LayerNorm(dim, eps=1e-6)
      self.temporal_attn = _Attention(dim, heads)
      self.temporal_fc = nn.Linear(dim, dim)
    self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim, hidden)

  def forward(self, x, frames):
    if self.scheme != 'divided':
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))
    cls, patches = x[:, :1], x[:, 1:]  # patches [B, (h w t), D]
    b, d = x.shape[0], x.shape[2]
    n = patches.shape[1] // frames
    # Temporal: in (h w t) order, each position's T tokens lie together.
    residual = self.temporal_attn(
        self.temporal_norm1(patches.reshape(b * n, frames, d)))
    patches = patches + self.temporal_fc(residual.reshape(b, n * frames, d))
    # Spatial: frame t's N tokens, with a copy of the class token each.
    per_frame = patches.reshape(b, n, frames, d).transpose(1, 2).reshape(
        b * frames, n, d)
    cls_copies = cls.expand(b, frames, d).reshape(b * frames, 1, d)
    out = self.attn(self.norm1(torch.cat([cls_copies, per_frame], 1)))
    cls_out = out[:, 0].reshape(b, frames, d).mean(1, keepdim=True)
    patch_out = out[:, 1:].reshape(b, frames, n, d).transpose(1, 2).reshape(
        b, n * frames, d)
    x = torch.cat([cls + cls_out, patches + patch_out], 1)
    return x + self.mlp(self.norm2(x))


class _VisionTransformer(nn.Module):
  """The original's model: embeddings, blocks, norm of the class token."""

  def __init__(self, m):
    super().__init__()
    d, n = m.hidden_size, (m.image_size[0] // m.patch_size) ** 2
    self.scheme = m.attention
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, d, m.patch_size, m.patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
    self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
    if m.attention != 'space_only':
      self.time_embed = nn.Parameter(torch.zeros(1, m.num_frames, d))
    self.blocks = nn.ModuleList(
        [_Block(d, m.num_heads, m.mlp_dim, m.attention)
         for _ in range(m.depth)])
    self.norm = nn.LayerNorm(d, eps=1e-6)
    self.head = nn.Linear(d, m.num_classes)

  def forward(self, clips):  # [B, T, H, W, 3]
    b, t = clips.shape[:2]
    frames = clips.permute(0, 1, 4, 2, 3).flatten(0, 1)  # [(b t), 3, H, W]
    x = self.patch_embed.proj(frames).flatten(2).transpose(1, 2)
    d = x.shape[-1]
    x = torch.cat([self.cls_token.expand(b * t, 1, d), x], 1) + self.pos_embed
    if self.scheme == 'space_only':
      for block in self.blocks:
        x = block(x, t)
      x = x.reshape(b, t, -1, d).mean(1)  # Frames averaged before the norm.
    else:
      cls = x[:b, :1]  # Every frame's class token is the same.
      patches = x[:, 1:].reshape(b, t, -1, d).transpose(1, 2)  # [B, N, T, D]
      patches = (patches + self.time_embed[:, None]).flatten(1, 2)
      x = torch.cat([cls, patches], 1)  # Patches in (h w t) order.
      for block in self.blocks:
        x = block(x, t)
    return self.head(self.norm(x)[:, 0])


class _Wrapper(nn.Module):
  """Gives the `model.` prefix of the original's `model_state`."""

  def __init__(self, m):
    super().__init__()
    self.model = _VisionTransformer(m)


def _original_pyth(path, scheme, seed=0, legacy=False, drop=None):
  """A `.pyth` as the original saves it; returns (config, torch model)."""
  config = tiny_config(scheme)
  reference = _randomize(_Wrapper(config.model), seed)
  state = reference.state_dict()
  if drop:
    del state[drop]
  checkpoint = {
      'epoch': 15, 'model_state': state,
      'optimizer_state': {'state': {0: {'momentum_buffer': torch.ones(3)}},
                          'param_groups': [{'lr': 0.005, 'params': [0]}]},
      'cfg': f'TIMESFORMER:\n  ATTENTION_TYPE: {ORIGINAL_TYPES[scheme]}\n'}
  torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
  return config, reference.model


@pytest.mark.parametrize('scheme,legacy', [('divided', False),
                                           ('divided', True),
                                           ('joint', False),
                                           ('space_only', False)])
def test_original_pyth_matches_the_original_forward(tmp_path, scheme, legacy):
  config, reference = _original_pyth(tmp_path / 'model.pyth', scheme,
                                     legacy=legacy)
  assert checkpoints.detect_format(tmp_path / 'model.pyth') == 'original'
  # The original does not record the number of heads: the config does.
  _cli(tmp_path / 'model.pyth', tmp_path / 'out', _config_file(scheme))
  loaded, params = tsformer_jax.load_checkpoint(tmp_path / 'out')
  assert loaded.model.to_dict() == config.model.to_dict()
  clips = random_clips(config, seed=3)
  ours = apply(tsformer_jax.create_model(loaded), params, clips)
  with torch.no_grad():
    want = reference(torch.from_numpy(clips)).numpy()
  assert want.std() > 0.05
  print(f'max |logit difference| original {scheme}: '
        f'{np.abs(ours - want).max():.2e}')
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


def test_token_order_matters_to_the_reference():
  """The (h w t) order is load-bearing: the torch reference fed the same
  weights but patches in (t h w) order gives other logits, so the match
  above checks the order, not just the names."""
  config = tiny_config('divided')
  reference = _randomize(_Wrapper(config.model), 0).model
  clips = torch.from_numpy(random_clips(config, seed=3))
  block = reference.blocks[0]
  x = torch.randn(2, 1 + 16 * 4, 64)
  with torch.no_grad():
    in_order = block(x, 4)
    # The same tokens listed time-major, run, then put back.
    patches = x[:, 1:].reshape(2, 16, 4, 64)
    swapped = torch.cat([x[:, :1], patches.transpose(1, 2).flatten(1, 2)], 1)
    out = block(swapped, 4)[:, 1:].reshape(2, 4, 16, 64).transpose(1, 2)
    assert (out.flatten(1, 2) - in_order[:, 1:]).abs().max() > 1e-2
    assert reference(clips).shape == (2, 10)


# ----------------------------------------------------------------------------
# ImageNet ViT

VIT = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=128, num_labels=10,
           layer_norm_eps=1e-6)


@pytest.fixture(scope='module')
def vit_files(tmp_path_factory):
  """One random HF ViT saved as HF safetensors, original .npz and timm."""
  root = tmp_path_factory.mktemp('vit')
  hf = _randomize(ViTForImageClassification(ViTConfig(**VIT)), 1)
  hf.save_pretrained(root / 'hf')
  # The file's names: those of every ViT on the Hub (transformers 5 renames
  # its modules in memory, not in files).
  sd = safetensors.numpy.load_file(root / 'hf' / 'model.safetensors')
  _save_vit_npz(sd, root / 'vit.npz')
  _save_vit_npz(sd, root / 'vit21k.npz', pre_logits=True)
  torch.save({'model': {k: torch.from_numpy(v)
                        for k, v in _timm_state(sd).items()}},
             root / 'vit_timm.pth')
  return hf, {'vit_hf': root / 'hf', 'vit_npz': root / 'vit.npz',
              'vit_timm': root / 'vit_timm.pth',
              'pre_logits': root / 'vit21k.npz'}


def _save_vit_npz(sd, path, pre_logits=False):
  """The HF ViT in the original ViT release's names and flax layout."""
  d, h = VIT['hidden_size'], VIT['num_attention_heads']
  out = {
      'cls': sd['vit.embeddings.cls_token'],
      'Transformer/posembed_input/pos_embedding':
          sd['vit.embeddings.position_embeddings'],
      'embedding/kernel': sd['vit.embeddings.patch_embeddings.projection.'
                             'weight'].transpose(2, 3, 1, 0),
      'embedding/bias': sd['vit.embeddings.patch_embeddings.projection.bias'],
      'Transformer/encoder_norm/scale': sd['vit.layernorm.weight'],
      'Transformer/encoder_norm/bias': sd['vit.layernorm.bias'],
      'head/kernel': sd['classifier.weight'].T,
      'head/bias': sd['classifier.bias'],
  }
  if pre_logits:
    out['pre_logits/kernel'] = np.eye(d, dtype=np.float32)
    out['pre_logits/bias'] = np.zeros(d, np.float32)
  for i in range(VIT['num_hidden_layers']):
    hf, ours = f'vit.encoder.layer.{i}.', f'Transformer/encoderblock_{i}/'
    attn = ours + 'MultiHeadDotProductAttention_1/'
    for name in ('query', 'key', 'value'):
      w = sd[f'{hf}attention.attention.{name}.weight']
      out[f'{attn}{name}/kernel'] = w.T.reshape(d, h, d // h)
      out[f'{attn}{name}/bias'] = sd[
          f'{hf}attention.attention.{name}.bias'].reshape(h, d // h)
    out[f'{attn}out/kernel'] = sd[
        f'{hf}attention.output.dense.weight'].T.reshape(h, d // h, d)
    out[f'{attn}out/bias'] = sd[f'{hf}attention.output.dense.bias']
    for theirs, name in (('layernorm_before', 'LayerNorm_0'),
                         ('layernorm_after', 'LayerNorm_2')):
      out[f'{ours}{name}/scale'] = sd[f'{hf}{theirs}.weight']
      out[f'{ours}{name}/bias'] = sd[f'{hf}{theirs}.bias']
    for theirs, name in (('intermediate.dense', 'Dense_0'),
                         ('output.dense', 'Dense_1')):
      out[f'{ours}MlpBlock_3/{name}/kernel'] = sd[f'{hf}{theirs}.weight'].T
      out[f'{ours}MlpBlock_3/{name}/bias'] = sd[f'{hf}{theirs}.bias']
  np.savez(path, **out)


def _timm_state(sd):
  """The HF ViT in timm's names (the original TimeSformer's, unprefixed)."""
  out = {'cls_token': sd['vit.embeddings.cls_token'],
         'pos_embed': sd['vit.embeddings.position_embeddings'],
         'patch_embed.proj.weight':
             sd['vit.embeddings.patch_embeddings.projection.weight'],
         'patch_embed.proj.bias':
             sd['vit.embeddings.patch_embeddings.projection.bias'],
         'norm.weight': sd['vit.layernorm.weight'],
         'norm.bias': sd['vit.layernorm.bias'],
         'head.weight': sd['classifier.weight'],
         'head.bias': sd['classifier.bias']}
  for i in range(VIT['num_hidden_layers']):
    hf, ours = f'vit.encoder.layer.{i}.', f'blocks.{i}.'
    for kind in ('weight', 'bias'):
      out[f'{ours}attn.qkv.{kind}'] = np.concatenate(
          [sd[f'{hf}attention.attention.{n}.{kind}']
           for n in ('query', 'key', 'value')])
      for theirs, name in (('attention.output.dense', 'attn.proj'),
                           ('layernorm_before', 'norm1'),
                           ('layernorm_after', 'norm2'),
                           ('intermediate.dense', 'mlp.fc1'),
                           ('output.dense', 'mlp.fc2')):
        out[f'{ours}{name}.{kind}'] = sd[f'{hf}{theirs}.{kind}']
  return out


VIT_FORMATS = ['vit_hf', 'vit_npz', 'vit_timm']


@pytest.mark.parametrize('fmt', VIT_FORMATS)
@pytest.mark.parametrize('scheme', SCHEMES)
def test_vit_loads_into_every_scheme(vit_files, fmt, scheme):
  """Spatial weights copied, earlier steps copies with zero fc, time zero."""
  _, files = vit_files
  assert checkpoints.detect_format(files[fmt]) == fmt
  config = tiny_config(scheme)
  loaded, params = tsformer_jax.load_checkpoint(files[fmt], config)
  _, image = tsformer_jax.load_checkpoint(files[fmt], tiny_config(
      'space_only', num_frames=1))
  steps = attention.get_scheme(scheme).steps
  for i in range(config.model.depth):
    block, vit = params[f'block_{i}'], image[f'block_{i}']['space_attention']
    for step in steps:
      got = block[f'{step.grouping}_attention']
      for part in ('norm', 'qkv', 'proj'):
        for name, value in vit[part].items():
          np.testing.assert_array_equal(got[part][name], value)
      if step.output_fc:
        assert not np.any(got['fc']['kernel']) and not np.any(
            got['fc']['bias'])
  for name in ('embedding', 'norm', 'head'):
    for leaf, value in image[name].items():
      np.testing.assert_array_equal(params[name][leaf], value)
  np.testing.assert_array_equal(params['pos_embedding'],
                                image['pos_embedding'])
  if scheme != 'space_only':
    assert params['time_embedding'].shape == (1, 4, 64)
    assert not np.any(params['time_embedding'])
  checkpoints.check_params(params, loaded)


@pytest.mark.parametrize('fmt', VIT_FORMATS)
def test_vit_init_is_the_image_model_frame_by_frame(vit_files, fmt):
  """space_only: exactly the ViT on each frame, class tokens averaged.
  divided (zero temporal_fc and time embedding): exactly the ViT when the
  frames are one image (the shared class token averages identical frames)."""
  hf, files = vit_files
  clips = random_clips(tiny_config('space_only'), seed=5)
  frames = torch.from_numpy(clips).flatten(0, 1).permute(0, 3, 1, 2)
  with torch.no_grad():
    hidden = hf.vit(frames, output_hidden_states=True).hidden_states[-1]
    cls = hidden[:, 0].reshape(2, 4, -1).mean(1)
    want = hf.classifier(hf.vit.layernorm(cls)).numpy()
  config, params = tsformer_jax.load_checkpoint(files[fmt],
                                                tiny_config('space_only'))
  ours = apply(tsformer_jax.create_model(config), params, clips)
  assert want.std() > 0.05
  print(f'max |logit difference| {fmt} space_only: '
        f'{np.abs(ours - want).max():.2e}')
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)

  still = np.repeat(clips[:, :1], 4, axis=1)  # One image, four frames.
  with torch.no_grad():
    want = hf(frames[::4]).logits.numpy()
  config, params = tsformer_jax.load_checkpoint(files[fmt],
                                                tiny_config('divided'))
  ours = apply(tsformer_jax.create_model(config), params, still)
  print(f'max |logit difference| {fmt} divided: '
        f'{np.abs(ours - want).max():.2e}')
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


def test_vit_head_default_config_pre_logits_and_resolution(vit_files):
  _, files = vit_files
  # The checkpoint's own config: divided over 8 frames, its 10 classes.
  config, params = tsformer_jax.load_checkpoint(files['vit_npz'])
  assert (config.model.attention, config.model.num_frames,
          config.model.num_classes) == ('divided', 8, 10)
  assert tuple(config.model.image_size) == (32, 32)
  assert config.model.num_heads == 4  # Read from the npz kernels.
  # Another class count: a new head, the rest unchanged.
  _, other = tsformer_jax.load_checkpoint(files['vit_npz'], num_classes=7,
                                          rng=jax.random.key(3))
  assert other['head']['kernel'].shape == (64, 7)
  assert 0 < np.std(other['head']['kernel']) < 0.03
  assert not np.any(other['head']['bias'])
  np.testing.assert_array_equal(other['block_1']['mlp']['fc2']['kernel'],
                                params['block_1']['mlp']['fc2']['kernel'])
  # ImageNet-21k files: the head sits on pre_logits, so both are dropped.
  config, params = tsformer_jax.load_checkpoint(files['pre_logits'])
  assert config.model.num_classes == 400
  assert params['head']['kernel'].shape == (64, 400)
  # Into twice the frame size: the position embedding resampled on the grid.
  image = np.load(files['vit_npz'])['Transformer/posembed_input/pos_embedding']
  _, params = tsformer_jax.load_checkpoint(
      files['vit_npz'], tiny_config('divided', image_size=(64, 64)))
  np.testing.assert_array_equal(params['pos_embedding'][:, :1], image[:, :1])
  np.testing.assert_array_equal(params['pos_embedding'][:, 1:],
                                _torch_nearest_2d(image[:, 1:], (4, 4), (8, 8)))


def test_init_params_from_config(vit_files, monkeypatch):
  _, files = vit_files
  config = tiny_config('axial')
  assert config.init_from.path == ''  # Fresh weights by default.
  monkeypatch.setattr(model_lib, 'init_params',
                      lambda c, rng: ('fresh', c, rng))
  rng = jax.random.key(0)
  assert checkpoints.init_params_from(config, rng) == ('fresh', config, rng)
  monkeypatch.undo()
  config.init_from.path = str(files['vit_timm'])
  config.init_from.format = 'vit_timm'
  params = checkpoints.init_params_from(config, jax.random.key(0))
  np.testing.assert_array_equal(
      params['block_0']['time_attention']['qkv']['kernel'],
      params['block_0']['height_attention']['qkv']['kernel'])
  assert isinstance(params['cls'], jax.Array)


# ----------------------------------------------------------------------------
# Resampling

def _torch_nearest_2d(patches, old, new):
  grid = torch.from_numpy(patches).reshape(1, *old, -1).permute(0, 3, 1, 2)
  out = F.interpolate(grid, size=new, mode='nearest')
  return out.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).numpy()


def _torch_nearest_1d(sequence, size):
  out = F.interpolate(torch.from_numpy(sequence).transpose(1, 2), size=size,
                      mode='nearest')
  return out.transpose(1, 2).numpy()


@pytest.mark.parametrize('old,new', [((14, 14), (28, 28)), ((4, 4), (7, 7)),
                                     ((7, 7), (5, 5)), ((3, 5), (6, 4)),
                                     ((14, 14), (9, 13))])
def test_resampling_is_torch_nearest_interpolation(old, new):
  pos = np.random.default_rng(0).normal(
      size=(1, 1 + old[0] * old[1], 8)).astype(np.float32)
  got = checkpoints.resample_pos_embedding(pos, old, new)
  np.testing.assert_array_equal(got[:, :1], pos[:, :1])
  np.testing.assert_array_equal(got[:, 1:],
                                _torch_nearest_2d(pos[:, 1:], old, new))
  got = checkpoints.resample_pos_embedding(pos, old, new, mode='1d')
  np.testing.assert_array_equal(
      got[:, 1:], _torch_nearest_1d(pos[:, 1:], new[0] * new[1]))
  for frames in (1, 3, 16, 96):
    time = pos[:, :8]
    np.testing.assert_array_equal(
        checkpoints.resample_time_embedding(time, frames),
        _torch_nearest_1d(time, frames))


def test_checkpoint_into_other_frames_and_resolution(tmp_path):
  """HF weights at 2 x 16 px into the tiny config's 4 x 32 px."""
  hf = _hf_timesformer(0, num_frames=2, image_size=16, patch_size=8,
                       hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128,
                       num_labels=10)
  src = _save_hf(hf, tmp_path / 'hf', 'safetensors')
  pos = hf.timesformer.embeddings.position_embeddings.detach().numpy()
  time = hf.timesformer.embeddings.time_embeddings.detach().numpy()
  for mode in ('2d', '1d'):
    out = tmp_path / mode
    _cli(src, out, _config_file('divided'), f'--pos_resize={mode}')
    config, params = tsformer_jax.load_checkpoint(out)
    assert (config.model.num_frames, tuple(config.model.image_size)) == (
        4, (32, 32))
    want = (_torch_nearest_2d(pos[:, 1:], (2, 2), (4, 4)) if mode == '2d'
            else _torch_nearest_1d(pos[:, 1:], 16))
    np.testing.assert_array_equal(params['pos_embedding'][:, 1:], want)
    np.testing.assert_array_equal(params['time_embedding'],
                                  _torch_nearest_1d(time, 4))
  direct = checkpoints.params_from_hf_state_dict(
      hf.state_dict(), checkpoints.config_from_hf(hf.config.to_dict()))
  np.testing.assert_array_equal(params['block_1']['time_attention']['fc'][
      'kernel'], direct['block_1']['time_attention']['fc']['kernel'])
  logits = apply(tsformer_jax.create_model(config), params,
                 random_clips(config))
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


@pytest.mark.parametrize('variant,frames,patches', [('hr', 16, 28 * 28),
                                                    ('l', 96, 14 * 14)])
def test_base_weights_fit_hr_and_l(variant, frames, patches):
  base = config_lib.get_config('divided', 'base')
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(
      lambda: tsformer_jax.init_params(base, jax.random.key(0)))
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  params['pos_embedding'] = rng.normal(size=(1, 197, 768)).astype(np.float32)
  params['time_embedding'] = rng.normal(size=(1, 8, 768)).astype(np.float32)
  target = config_lib.get_config('divided', variant)
  got = checkpoints.adapt_params(params, base, target)
  assert got['pos_embedding'].shape == (1, 1 + patches, 768)
  np.testing.assert_array_equal(
      got['pos_embedding'][:, 1:],
      _torch_nearest_2d(params['pos_embedding'][:, 1:], (14, 14),
                        (math.isqrt(patches),) * 2))
  np.testing.assert_array_equal(
      got['time_embedding'],
      _torch_nearest_1d(params['time_embedding'], frames))


# ----------------------------------------------------------------------------
# Safety

class _RunsCode:
  """Unpickling this runs code: it writes the marker file."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return exec, (f'open({self.marker!r}, "w").close()',)


@pytest.mark.parametrize('kind', ['pickle', 'torch_zip', 'torch_legacy',
                                  'hf_bin'])
def test_malicious_pickle_runs_nothing(tmp_path, kind):
  marker = tmp_path / 'ran'
  payload = {'model_state': {'model.pos_embed': _RunsCode(marker),
                             'model.cls_token': torch.zeros(1, 1, 4)}}
  path = tmp_path / 'evil.pyth'
  if kind == 'pickle':
    with open(path, 'wb') as f:
      pickle.dump(payload, f)
  elif kind == 'hf_bin':
    hf = _hf_timesformer(0, num_frames=2, image_size=16, patch_size=8,
                         hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)
    path = _save_hf(hf, tmp_path / 'hf', 'bin')
    state = dict(hf.state_dict())
    state['classifier.bias'] = _RunsCode(marker)
    torch.save(state, path / 'pytorch_model.bin')
  else:
    torch.save(payload, path,
               _use_new_zipfile_serialization=kind == 'torch_zip')
  with pytest.raises(tensor_io.UnsafePickleError,
                     match=r'global (__builtin__|builtins)\.exec'):
    tsformer_jax.load_checkpoint(path)
  assert convert.main(['convert', str(path), str(tmp_path / 'out')]) == 1
  assert not marker.exists() and not (tmp_path / 'out').exists()
  if kind == 'pickle':  # The payload is real: plain pickle runs it.
    with open(path, 'rb') as f:
      pickle.load(f)
    assert marker.exists()


_NO_TORCH = '''
import importlib.abc, json, sys
import flax
import numpy as np

class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('torch', 'transformers'):
      raise ImportError(f'{name} is blocked in this test')

sys.meta_path.insert(0, Blocked())
import tsformer_jax
from tsformer_jax import config_lib
sums = {}
for name, path, scheme in json.loads(sys.argv[1]):
  config = config_lib.get_config(scheme, 'tiny') if scheme else None
  _, params = tsformer_jax.load_checkpoint(path, config)
  sums[name] = {'/'.join(k): float(np.sum(np.asarray(v, np.float64)))
                for k, v in flax.traverse_util.flatten_dict(params).items()}
assert not any(m.split('.')[0] == 'torch' for m in sys.modules)
print(json.dumps(sums))
'''


def test_loading_works_without_torch(tmp_path, vit_files):
  _, files = vit_files
  _original_pyth(tmp_path / 'model.pyth', 'divided')
  _original_pyth(tmp_path / 'legacy.pyth', 'joint', legacy=True)
  hf = _hf_timesformer(0, num_frames=2, image_size=16, patch_size=8,
                       hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)
  _save_hf(hf, tmp_path / 'hf_bin', 'bin')
  jobs = [('pyth', str(tmp_path / 'model.pyth'), 'divided'),
          ('legacy', str(tmp_path / 'legacy.pyth'), 'joint'),
          ('hf_bin', str(tmp_path / 'hf_bin'), None),
          ('vit_timm', str(files['vit_timm']), 'divided'),
          ('vit_hf', str(files['vit_hf']), 'space_only')]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
  result = subprocess.run([sys.executable, '-c', _NO_TORCH, json.dumps(jobs)],
                          capture_output=True, text=True, env=env, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  sums = json.loads(result.stdout.strip().splitlines()[-1])
  for name, path, scheme in jobs:
    config = config_lib.get_config(scheme, 'tiny') if scheme else None
    _, params = tsformer_jax.load_checkpoint(path, config)
    want = {'/'.join(k): float(np.sum(np.asarray(v, np.float64)))
            for k, v in _items(params)}
    assert sums[name] == want, name


# ----------------------------------------------------------------------------
# Orbax, errors

def test_orbax_round_trip(tmp_path, monkeypatch):
  config = tiny_config('sparse_local_global', image_size=(32, 48))
  config.init_from.path = 'somewhere.npz'
  params = _random_params(config)
  checkpoints.save_checkpoint(tmp_path / 'ckpt', config, params)
  assert checkpoints.detect_format(tmp_path / 'ckpt') == 'orbax'
  monkeypatch.chdir(tmp_path)  # A relative path, as users type it.
  loaded_config, loaded = tsformer_jax.load_checkpoint('ckpt')
  assert loaded_config.to_dict() == config.to_dict()
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params),
                       strict=True):
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(want))
  # Existing output: refused unless asked to overwrite.
  with pytest.raises(FileExistsError):
    checkpoints.save_checkpoint(tmp_path / 'ckpt', config, params)
  checkpoints.save_checkpoint(tmp_path / 'ckpt', config, params,
                              overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ['ckpt']


def test_training_checkpoints_load(tmp_path):
  """A CheckpointManager's latest step, params inside a `state` item."""
  config = tiny_config('divided')
  params = _random_params(config)
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints')
  for step in (10, 20):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(dict(
            step=np.int32(step),
            params=jax.tree.map(lambda x, s=step: x + s, params),
            opt_state={'mu': params})),
        config=ocp.args.JsonSave(config.to_dict())))
  manager.wait_until_finished()
  loaded_config, loaded = tsformer_jax.load_checkpoint(tmp_path /
                                                       'checkpoints')
  assert loaded_config.to_dict() == config.to_dict()
  np.testing.assert_array_equal(loaded['cls'], np.asarray(params['cls']) + 20)


def test_errors_name_the_file_parameter_and_shapes(tmp_path):
  junk = tmp_path / 'weights.dat'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match=r'weights\.dat: not a torch\.save'):
    tsformer_jax.load_checkpoint(junk)
  with pytest.raises(ValueError, match='unknown checkpoint format'):
    tsformer_jax.load_checkpoint(tmp_path)
  np.savez(tmp_path / 'other.npz', x=np.zeros(3))
  with pytest.raises(ValueError, match=r"other\.npz: not an original ViT "
                     r"\.npz: 'embedding/kernel' is missing"):
    tsformer_jax.load_checkpoint(tmp_path / 'other.npz')
  torch.save({'a': torch.zeros(2)}, tmp_path / 'other.pth')
  with pytest.raises(ValueError, match=r"other\.pth: unknown checkpoint "
                     r"format.*\['a'\]"):
    tsformer_jax.load_checkpoint(tmp_path / 'other.pth')
  with pytest.raises(ValueError, match="Unknown checkpoint format 'onnx'"):
    tsformer_jax.load_checkpoint(junk, format='onnx')

  # A missing key: the file and the key.
  _original_pyth(tmp_path / 'cut.pyth', 'divided',
                 drop='model.blocks.1.temporal_fc.bias')
  with pytest.raises(ValueError, match=r"cut\.pyth does not fit.*missing "
                     r"\['model\.blocks\.1\.temporal_fc\.bias'\]"):
    tsformer_jax.load_checkpoint(tmp_path / 'cut.pyth', tiny_config())
  # A misshapen tensor: the file, the parameter and both shapes.
  state = dict(_Wrapper(tiny_config().model).state_dict())
  state['model.time_embed'] = torch.zeros(1, 4, 32)
  torch.save({'model_state': state}, tmp_path / 'bad.pyth')
  with pytest.raises(ValueError, match=r"bad\.pyth: parameter "
                     r"'model\.time_embed' has shape \[1, 4, 32\].*"
                     r"'time_embedding' needs \[1, 4, 64\]"):
    tsformer_jax.load_checkpoint(tmp_path / 'bad.pyth', tiny_config())
  # Weights that do not fit the config asked for: nothing at OUT.
  _original_pyth(tmp_path / 'good.pyth', 'divided')
  out = tmp_path / 'out'
  assert convert.main(['convert', str(tmp_path / 'good.pyth'), str(out),
                       _config_file('divided'),
                       '--config.model.mlp_dim=256']) == 1
  with pytest.raises(ValueError, match=r'good\.pyth does not fit config\.'
                     r'model: the checkpoint has .*mlp_dim=128.* but '
                     r'config\.model .*mlp_dim=256'):
    tsformer_jax.load_checkpoint(tmp_path / 'good.pyth', tiny_config(
        mlp_dim=256))
  with pytest.raises(ValueError, match="cannot load 'divided' weights into "
                     "a 'axial' model"):
    tsformer_jax.load_checkpoint(tmp_path / 'good.pyth', tiny_config('axial'))
  assert not out.exists()
  # Params that do not fit their config are never written.
  params = _random_params(tiny_config('joint'))
  params['cls'] = np.zeros((1, 1, 32), np.float32)
  with pytest.raises(ValueError, match=r"'cls' has \[1, 1, 32\] but "
                     r"config\.model needs \[1, 1, 64\]"):
    checkpoints.save_checkpoint(out, tiny_config('joint'), params)
  assert not out.exists()


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
  def fail(self, directory, *args, **kwargs):
    os.makedirs(directory)
    (pathlib.Path(directory) / 'partial').write_text('half')
    raise OSError('disk full')
  monkeypatch.setattr(ocp.Checkpointer, 'save', fail)
  with pytest.raises(OSError, match='disk full'):
    checkpoints.save_checkpoint(tmp_path / 'out', tiny_config('joint'),
                                _random_params(tiny_config('joint')))
  assert os.listdir(tmp_path) == []


def test_torch_reader_rebuilds_every_tensor(tmp_path):
  base = torch.arange(20.0).reshape(4, 5)
  tensors = {'plain': base, 'transposed': base.T, 'view': base[1:, 2:],
             'half': torch.randn(3).half(), 'bf16': torch.randn(3).bfloat16(),
             'long': torch.arange(6)[::2], 'bool': torch.tensor([True, False]),
             'scalar': torch.tensor(2.5), 'empty': torch.zeros(0, 3),
             'parameter': nn.Parameter(torch.randn(2, 2))}
  for legacy in (False, True):
    path = tmp_path / f'{legacy}.pt'
    torch.save({'state_dict': tensors, 'step': 3, 'name': 'x'}, path,
               _use_new_zipfile_serialization=not legacy)
    got = tensor_io.read_torch(str(path))
    assert (got['step'], got['name']) == (3, 'x')
    for name, tensor in tensors.items():
      want = tensor.detach().float().numpy() if tensor.is_floating_point() \
          else tensor.numpy()
      value = np.asarray(got['state_dict'][name])
      assert value.shape == want.shape, name
      np.testing.assert_array_equal(value.astype(want.dtype), want)
  # safetensors with bfloat16 (which the safetensors numpy reader refuses).
  save_file({'bf16': tensors['bf16'], 'plain': base},
            str(tmp_path / 'x.safetensors'))
  got = tensor_io.read_safetensors(str(tmp_path / 'x.safetensors'))
  np.testing.assert_array_equal(np.asarray(got['bf16'], np.float32),
                                tensors['bf16'].float().numpy())
  np.testing.assert_array_equal(np.asarray(got['plain']), base.numpy())
