#!/usr/bin/env bash
# Lint the tree with ruff (settings in ruff.toml). Usage: bash scripts/lint.sh [extra ruff check args]
# ruff comes with the test extra's tools: pip install ruff
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v ruff >/dev/null 2>&1; then
    ruff=(ruff)
elif python -c "import ruff" >/dev/null 2>&1; then
    ruff=(python -m ruff)
else
    echo "lint: ruff is not installed (pip install ruff)" >&2
    exit 2
fi
"${ruff[@]}" --version
"${ruff[@]}" check "$@" .
