#!/usr/bin/env bash
# One command: create .venv (Python 3.12), install everything, then run the demo on the built-in tiny model.
#   bash setup.sh            # set up + demo
#   bash setup.sh --no-demo  # set up only (used by .ci/run)
# Re-running is fast: the install step is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in /root/.pyenv/versions/3.12.1/bin/python3.12 python3.12; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
[ -n "$PYTHON" ] || { echo "setup.sh: Python 3.12 not found (set PYTHON=/path/to/python3.12)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.mimo_v2_flash_installed
want="$(sha256sum pyproject.toml constraints.txt setup.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # Exactly the set CI tests (constraints.txt) within the ranges pyproject.toml declares.
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
  # Packages whose declared dependencies cannot install here: pyproject.toml [tool.mimo_v2_flash] no-deps.
  nodeps=$(.venv/bin/python -c "import tomllib;print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['mimo_v2_flash']['no-deps']))")
  .venv/bin/python -m pip install --quiet --no-deps -c constraints.txt $nodeps
  # Megatron's import-time notices go to a log; only the answer (or, on failure, the whole log) is shown.
  check="import megatron.bridge.models.mimo_v2_flash as m; print('overlay active:', m.__file__)"
  if ! .venv/bin/python -c "$check" > .venv/overlay_check.log 2>&1; then cat .venv/overlay_check.log >&2; exit 1; fi
  tail -n 1 .venv/overlay_check.log
  echo "$want" > "$stamp"
else
  echo "== .venv up to date"
fi

if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/python examples/models/mimo_v2_flash/demo.py
fi
