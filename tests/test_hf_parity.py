"""Logits equal to Hugging Face `transformers`' TimeSformer (PyTorch, CPU).

The HF model is built with random weights (every parameter redrawn, so the
zero-initialised time embedding and temporal_fc matter too), converted with
`checkpoints.params_from_hf_state_dict`, and both run in float32 eval mode.
HF supports square patch grids only; non-square grids are covered by the
masked-attention tests in test_attention.py.
"""

import jax
import numpy as np
import optax
import pytest
import torch
from transformers import TimesformerConfig
from transformers import TimesformerForVideoClassification

import tsformer_jax
from tsformer_jax import checkpoints

from conftest import apply
from conftest import hf_logits

ATOL = 1e-4  # float32 logits


def _hf_model(seed, **kwargs):
  torch.manual_seed(seed)
  model = TimesformerForVideoClassification(TimesformerConfig(**kwargs))
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.1)
  return model.eval()


CASES = [
    # attention_type, frames, image, patch, width, depth, heads, classes
    ('divided_space_time', 3, 32, 8, 32, 2, 2, 5),
    ('divided_space_time', 5, 48, 16, 48, 3, 4, 7),
    ('divided_space_time', 1, 64, 16, 32, 2, 1, 3),
    ('joint_space_time', 3, 32, 8, 32, 2, 2, 5),
    ('joint_space_time', 7, 48, 16, 64, 1, 8, 4),
    ('space_only', 3, 32, 8, 32, 2, 2, 5),
    ('space_only', 4, 48, 16, 48, 3, 3, 6),
]


@pytest.mark.parametrize(
    'attention_type,frames,image,patch,width,depth,heads,classes', CASES)
def test_small_configs_match_hf(attention_type, frames, image, patch, width,
                                depth, heads, classes):
  hf = _hf_model(len(attention_type) + frames, attention_type=attention_type,
                 num_frames=frames, image_size=image, patch_size=patch,
                 hidden_size=width, num_hidden_layers=depth,
                 num_attention_heads=heads, intermediate_size=3 * width,
                 num_labels=classes)
  config = checkpoints.config_from_hf(hf.config.to_dict())
  assert config.model.attention == checkpoints.HF_ATTENTION_TYPES[
      attention_type]
  params = checkpoints.params_from_hf_state_dict(hf.state_dict(), config)
  clips = np.random.default_rng(frames).normal(
      size=(2, frames, image, image, 3)).astype(np.float32)
  ours = apply(tsformer_jax.create_model(config), params, clips)
  want = hf_logits(hf, clips)
  assert ours.shape == want.shape == (2, classes)
  assert want.std() > 0.05  # Logits spread far beyond the tolerance.
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_base_size_divided_matches_hf():
  hf = _hf_model(0, num_labels=400)  # Defaults: the 8 x 224 base model.
  with torch.no_grad():  # Realistic scales: LayerNorm near one, small weights.
    for name, p in hf.named_parameters():
      if 'layernorm' in name and name.endswith('weight'):
        p.add_(1.0)
      else:
        p.mul_(0.2)
  config = checkpoints.config_from_hf(hf.config.to_dict())
  assert config.model.depth == 12 and config.model.hidden_size == 768
  params = checkpoints.params_from_hf_state_dict(hf.state_dict(), config)
  clips = np.random.default_rng(0).normal(
      size=(1, 8, 224, 224, 3)).astype(np.float32)
  ours = apply(tsformer_jax.create_model(config), params, clips)
  want = hf_logits(hf, clips)
  assert want.std() > 0.1
  np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize('attention_type', ['divided_space_time',
                                            'joint_space_time'])
def test_training_gradients_match_hf(attention_type):
  """Every parameter's gradient of the training loss equals PyTorch's.

  HF's gradients are mapped to our parameter layout with the same converter
  as its weights (a pure re-layout, so it maps gradients too). This checks
  our backward pass, including the linear layers' CPU weight gradient
  (`kernels.cpu._cpu_linear`), against an independent autograd.
  """
  hf = _hf_model(1, attention_type=attention_type, num_frames=3,
                 image_size=32, patch_size=8, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=80, num_labels=5)
  config = checkpoints.config_from_hf(hf.config.to_dict())
  config.model.drop_path = 0.0
  params = checkpoints.params_from_hf_state_dict(hf.state_dict(), config)
  clips = np.random.default_rng(0).normal(
      size=(2, 3, 32, 32, 3)).astype(np.float32)
  labels = np.array([1, 4])

  pixels = torch.from_numpy(clips).permute(0, 1, 4, 2, 3)
  loss = torch.nn.functional.cross_entropy(hf(pixels).logits,
                                           torch.from_numpy(labels))
  loss.backward()
  want = checkpoints.params_from_hf_state_dict(
      {name: p.grad for name, p in hf.named_parameters()}, config)

  model = tsformer_jax.create_model(config)

  def loss_fn(p):
    logits = model.apply({'params': p}, clips, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  ours = jax.jit(jax.grad(loss_fn))(params)
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  for path, grad in jax.tree_util.tree_leaves_with_path(ours):
    name = jax.tree_util.keystr(path)
    reference = np.asarray(flat_want[path])
    scale = np.abs(reference).max()
    assert scale > 1e-7, name  # Every parameter is in play.
    np.testing.assert_allclose(grad, reference, atol=1e-4 * scale, rtol=0,
                               err_msg=name)


def test_converter_names_the_misfit():
  hf = _hf_model(0, num_frames=2, image_size=32, patch_size=16, hidden_size=16,
                 num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, num_labels=3)
  config = checkpoints.config_from_hf(hf.config.to_dict())
  state = dict(hf.state_dict())
  config.model.num_frames = 4
  with pytest.raises(ValueError, match=r"time_embeddings' has shape "
                     r"\[1, 2, 16\].*'time_embedding' needs \[1, 4, 16\]"):
    checkpoints.params_from_hf_state_dict(state, config, source='ckpt.bin')
  config.model.num_frames = 2
  config.model.depth = 2
  with pytest.raises(ValueError, match=r'missing \[.*layer\.1\.'):
    checkpoints.params_from_hf_state_dict(state, config)
  config.model.depth = 1
  state['extra.weight'] = np.zeros(3)
  with pytest.raises(ValueError, match=r"unused \['extra.weight'\]"):
    checkpoints.params_from_hf_state_dict(state, config)
  with pytest.raises(ValueError, match="valid: .*'divided_space_time'"):
    checkpoints.config_from_hf({'attention_type': 'axial'})
