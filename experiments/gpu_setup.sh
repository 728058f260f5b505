#!/usr/bin/env bash
# Prepares a GPU machine for experiments/gpu_benchmark.py.
#
#   bash experiments/gpu_setup.sh download   # where PyPI is reachable:
#                                            # wheels into build/gpu_wheels
#   bash experiments/gpu_setup.sh            # on the GPU machine
#
# The GPU machine's image already holds JAX with CUDA, PyTorch with CUDA,
# transformers, flax, optax and orbax, and reaches no package index; of
# what `import tsformer_jax` needs it lacks ml_collections (and PyAV,
# which only the video datasets use). So this script installs, without
# touching what is there:
# - each missing package from build/gpu_wheels (carry that folder to the
#   machine), else from PyPI where reachable;
# - tsformer_jax itself, editable and without dependencies;
# - on a bare machine with an index, JAX with CUDA ("jax[$JAX_CUDA]",
#   default cuda12) and torch and transformers when they are missing.
# Never `pip install -e '.[test]'` there: it pins the CPU build of torch.
# Without PyAV a stub module stands in (the benchmark decodes no video).
# Ends by printing the versions and the devices JAX and PyTorch see.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-build/gpu_wheels}
PIP=("$PY" -m pip install --disable-pip-version-check --no-input)

if [[ "${1:-install}" == download ]]; then
  mkdir -p "$WHEELS"
  # Pure Python: fits the image's Python 3.12 and any other.
  "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" \
      'ml-collections>=1.0'
  ls -l "$WHEELS"
  exit 0
fi

have() { "$PY" -c "import $1" 2>/dev/null; }

install() {  # install PIP_NAME: from the carried wheels, else an index.
  if compgen -G "$WHEELS/*.whl" >/dev/null &&
      "${PIP[@]}" --no-index --find-links "$WHEELS" --no-deps "$1"; then
    return 0
  fi
  "${PIP[@]}" "$1"
}

# REQUIRE_GPU=0 checks the rest on a machine without a GPU.
if [[ "${REQUIRE_GPU:-1}" != 0 ]] &&
    ! "$PY" -c 'import jax; assert jax.default_backend() == "gpu"' \
    2>/dev/null; then
  echo "JAX sees no GPU: installing jax[${JAX_CUDA:-cuda12}]"
  "${PIP[@]}" "jax[${JAX_CUDA:-cuda12}]"
fi
for pair in ml_collections:ml-collections einops:einops flax:flax \
    optax:optax orbax.checkpoint:orbax-checkpoint yaml:pyyaml \
    absl:absl-py torch:torch transformers:transformers; do
  have "${pair%%:*}" || install "${pair#*:}"
done
if ! have av; then
  site=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
  mkdir -p "$site/av"
  cat >"$site/av/__init__.py" <<'EOF'
"""A stand-in for PyAV where it is not installed: benchmarks decode no
video; anything that would raises."""


class FFmpegError(Exception):
  pass


class VideoFrame:
  pass


time_base = 1_000_000


def open(*args, **kwargs):  # noqa: A001
  raise FFmpegError('PyAV is not installed on this machine.')
EOF
  echo "PyAV missing: a stub stands in ($site/av)"
fi
"${PIP[@]}" --no-deps --no-build-isolation --no-index -e . >/dev/null
"$PY" - <<'EOF'
import importlib.metadata as md
import jax
import tsformer_jax  # noqa: F401
for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers'):
  try:
    print(f'{name} {md.version(name)}')
  except md.PackageNotFoundError:
    print(f'{name} missing')
print('jax devices:', jax.devices())
try:
  import torch
  print('torch cuda:', torch.cuda.is_available(),
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
except ImportError:
  pass
EOF
