"""Checkpoints: read every source of weights, fit it to a config, write ours.

- `api`: `load_checkpoint` (read, then fit), `read_checkpoint` (in the
  checkpoint's own shapes), `detect_format`; `init_source` and
  `init_params_from` (what training starts from).
- `formats`: one reader per format in `FORMATS`: `orbax` (ours, also
  `save_checkpoint`), `hf` (Hugging Face TimeSformer), `original` (the
  original's `.pyth`), `vit` (ImageNet ViT as `.npz`, Hugging Face or timm);
  `state_dicts` holds the PyTorch names that `hf`, `original` and timm share.
- `export`: writes ours out for PyTorch (`write_hf`: a Hugging Face
  directory; `write_pyth`: the original's `.pyth`), each its reader's inverse
  (imported on its own: it reads datasets' class names).
- `adapt`: fits weights to another config (`adapt_params`): embeddings
  resampled, single-step schemes inflated, a new head.
- `spec`: the parameter shapes a config fixes (`check_params`) and our
  checkpoints' item names.
- `training`: the training loop's checkpoints, which `load_checkpoint` reads.
- `hub`: Hugging Face Hub ids (`facebook/timesformer-base-finetuned-k400`)
  wherever a path goes, read through the Hub client's cache (needs the
  optional `huggingface_hub`).

Pickled files are read by `tensor_io.read_torch`, which never runs pickled
code; nothing here needs torch.
"""

from tsformer_jax.checkpoints import hub
from tsformer_jax.checkpoints import training
from tsformer_jax.checkpoints.adapt import IMAGE_MODEL_SCHEMES
from tsformer_jax.checkpoints.adapt import POS_RESIZE_MODES
from tsformer_jax.checkpoints.adapt import adapt_params
from tsformer_jax.checkpoints.adapt import nearest_indices
from tsformer_jax.checkpoints.adapt import resample_pos_embedding
from tsformer_jax.checkpoints.adapt import resample_time_embedding
from tsformer_jax.checkpoints.api import FORMATS
from tsformer_jax.checkpoints.api import IMAGE_FORMATS
from tsformer_jax.checkpoints.api import detect_format
from tsformer_jax.checkpoints.api import init_params_from
from tsformer_jax.checkpoints.api import init_source
from tsformer_jax.checkpoints.api import load_checkpoint
from tsformer_jax.checkpoints.api import read_checkpoint
from tsformer_jax.checkpoints.formats.hf import HF_PARAMETER_NAMES
from tsformer_jax.checkpoints.formats.hf import config_from_hf
from tsformer_jax.checkpoints.formats.hf import hf_module_names
from tsformer_jax.checkpoints.formats.hf import params_from_hf_state_dict
from tsformer_jax.checkpoints.formats.orbax import save_args
from tsformer_jax.checkpoints.formats.orbax import save_checkpoint
from tsformer_jax.checkpoints.formats.original import (
    params_from_original_state_dict,
)
from tsformer_jax.checkpoints.formats.state_dicts import HF_ATTENTION_TYPES
from tsformer_jax.checkpoints.formats.state_dicts import TORCH_NAMES
from tsformer_jax.checkpoints.formats.state_dicts import TORCH_SCHEMES
from tsformer_jax.checkpoints.formats.state_dicts import params_from_state_dict
from tsformer_jax.checkpoints.formats.state_dicts import (
    params_from_torch_state_dict,
)
from tsformer_jax.checkpoints.formats.state_dicts import torch_names
from tsformer_jax.checkpoints.spec import CONFIG_ITEM
from tsformer_jax.checkpoints.spec import PARAMS_ITEM
from tsformer_jax.checkpoints.spec import STATE_ITEM
from tsformer_jax.checkpoints.spec import check_params
from tsformer_jax.checkpoints.spec import config_from_json
from tsformer_jax.checkpoints.spec import config_to_json

__all__ = [
    'CONFIG_ITEM', 'FORMATS', 'HF_ATTENTION_TYPES', 'HF_PARAMETER_NAMES',
    'IMAGE_FORMATS', 'IMAGE_MODEL_SCHEMES', 'PARAMS_ITEM', 'POS_RESIZE_MODES',
    'STATE_ITEM', 'TORCH_NAMES', 'TORCH_SCHEMES', 'adapt_params',
    'check_params', 'config_from_hf', 'config_from_json', 'config_to_json',
    'detect_format', 'hf_module_names', 'hub', 'init_params_from',
    'init_source', 'load_checkpoint', 'nearest_indices',
    'params_from_hf_state_dict', 'params_from_original_state_dict',
    'params_from_state_dict', 'params_from_torch_state_dict',
    'read_checkpoint',
    'resample_pos_embedding', 'resample_time_embedding', 'save_args',
    'save_checkpoint', 'torch_names', 'training',
]
