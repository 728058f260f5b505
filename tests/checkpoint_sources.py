"""Checkpoints of every format, built from small random models.

Hugging Face TimeSformers and ViTs (PyTorch, CPU), an original-layout `.pyth`
from a torch model written below from the original code's equations, and ViT
`.npz` and timm files derived from the HF ViT by this file's own name mapping.
"""

import math
import os
import pathlib

import jax
import numpy as np
import safetensors.numpy
import torch
from torch import nn
import torch.nn.functional as F
from transformers import TimesformerConfig
from transformers import TimesformerForVideoClassification
from transformers import ViTConfig
from transformers import ViTForImageClassification

import tsformer_jax
from tsformer_jax import checkpoints
from tsformer_jax import cli
from tsformer_jax import convert

from conftest import tiny_config

ROOT = pathlib.Path(__file__).parent.parent
# What the original TimeSformer calls our three torch schemes.
_ORIGINAL_TYPES = {v: k for k, v in checkpoints.HF_ATTENTION_TYPES.items()}


def randomize(module, seed):
  """Every parameter redrawn, so zero-initialised ones count as well."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0.0, 0.1)
  return module.eval()


def run_convert(*args):
  """`python -m tsformer_jax.convert ARGS`, in this process."""
  assert cli.call(convert.main, ['convert', *map(str, args)]) == 0


def config_file(scheme, variant='tiny'):
  return f'--config={ROOT / "configs" / scheme}.py:{variant}'


def random_params(config, seed=0):
  """Random float32 params of `config`'s shapes, without compiling init."""
  shapes = jax.eval_shape(
      lambda: tsformer_jax.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


# ----------------------------------------------------------------------------
# Hugging Face TimeSformer

def hf_timesformer(seed, **kwargs):
  return randomize(
      TimesformerForVideoClassification(TimesformerConfig(**kwargs)), seed)


def save_hf(model, directory, weights):
  """`save_pretrained`, then `.bin` weights in place of safetensors if asked
  (transformers 5 writes safetensors only; older releases wrote this)."""
  model.save_pretrained(directory)
  if weights != 'safetensors':
    os.remove(directory / 'model.safetensors')
    torch.save(model.state_dict(), directory / 'pytorch_model.bin',
               _use_new_zipfile_serialization=weights == 'bin')
  return directory


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
  """A block; divided: time within each position, then space per frame.

  `drop_path` acts on each branch where the original's `DropPath` does: on
  the time branch before `temporal_fc`, on the space branch before the
  class-token copies are averaged. An identity here; tests swap it.
  """

  def __init__(self, dim, heads, hidden, scheme):
    super().__init__()
    self.scheme = scheme
    self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), _Attention(dim, heads)
    if scheme == 'divided':
      self.temporal_norm1 = nn.LayerNorm(dim, eps=1e-6)
      self.temporal_attn = _Attention(dim, heads)
      self.temporal_fc = nn.Linear(dim, dim)
    self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim, hidden)
    self.drop_path = nn.Identity()

  def forward(self, x, frames):
    if self.scheme != 'divided':
      x = x + self.drop_path(self.attn(self.norm1(x)))
      return x + self.drop_path(self.mlp(self.norm2(x)))
    cls, patches = x[:, :1], x[:, 1:]  # patches [B, (h w t), D]
    b, d = x.shape[0], x.shape[2]
    n = patches.shape[1] // frames
    # Temporal: in (h w t) order, each position's T tokens lie together.
    residual = self.drop_path(self.temporal_attn(
        self.temporal_norm1(patches.reshape(b * n, frames, d))))
    patches = patches + self.temporal_fc(residual.reshape(b, n * frames, d))
    # Spatial: frame t's N tokens, with a copy of the class token each.
    per_frame = patches.reshape(b, n, frames, d).transpose(1, 2).reshape(
        b * frames, n, d)
    cls_copies = cls.expand(b, frames, d).reshape(b * frames, 1, d)
    out = self.drop_path(
        self.attn(self.norm1(torch.cat([cls_copies, per_frame], 1))))
    cls_out = out[:, 0].reshape(b, frames, d).mean(1, keepdim=True)
    patch_out = out[:, 1:].reshape(b, frames, n, d).transpose(1, 2).reshape(
        b, n * frames, d)
    x = torch.cat([cls + cls_out, patches + patch_out], 1)
    return x + self.drop_path(self.mlp(self.norm2(x)))


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


class OriginalModel(nn.Module):
  """The original's model, under the `model.` prefix of its `model_state`."""

  def __init__(self, m):
    super().__init__()
    self.model = _VisionTransformer(m)


def original_pyth(path, scheme, seed=0, legacy=False, drop=None):
  """A `.pyth` as the original saves it; returns (config, torch model)."""
  config = tiny_config(scheme)
  reference = randomize(OriginalModel(config.model), seed)
  state = reference.state_dict()
  if drop:
    del state[drop]
  checkpoint = {
      'epoch': 15, 'model_state': state,
      'optimizer_state': {'state': {0: {'momentum_buffer': torch.ones(3)}},
                          'param_groups': [{'lr': 0.005, 'params': [0]}]},
      'cfg': f'TIMESFORMER:\n  ATTENTION_TYPE: {_ORIGINAL_TYPES[scheme]}\n'}
  torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
  return config, reference.model


# ----------------------------------------------------------------------------
# ImageNet ViT

VIT = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=128, num_labels=10,
           layer_norm_eps=1e-6)
VIT_FORMATS = ['vit_hf', 'vit_npz', 'vit_timm']


def save_vits(root):
  """One random HF ViT in every ViT format: `(model, paths by format)`; the
  paths also hold `pre_logits`, an `.npz` laid out as ImageNet-21k's."""
  hf = randomize(ViTForImageClassification(ViTConfig(**VIT)), 1)
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


# ----------------------------------------------------------------------------
# Resampling as torch does it

def torch_nearest_2d(patches, old, new):
  grid = torch.from_numpy(patches).reshape(1, *old, -1).permute(0, 3, 1, 2)
  out = F.interpolate(grid, size=new, mode='nearest')
  return out.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).numpy()


def torch_nearest_1d(sequence, size):
  out = F.interpolate(torch.from_numpy(sequence).transpose(1, 2), size=size,
                      mode='nearest')
  return out.transpose(1, 2).numpy()
