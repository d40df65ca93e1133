# Sourced by demo.sh and test.sh: creates .venv (once) and installs the package
# with its test extra, re-installing only when setup.cfg changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEEPEXIT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "error: Python 3.11+ is required (found $("$PY" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 2
}
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating virtualenv $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.deepexit-installed"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "installing deepexit_jax and its dependencies into $VENV (first run: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" >&2
  echo "$WANT" > "$STAMP"
fi
# Real datasets live beside the project (../shared/data) when present.
if [[ -z "${DEEPEXIT_DATA_DIR:-}" && -d "$ROOT/../shared/data" ]]; then
  export DEEPEXIT_DATA_DIR="$(cd "$ROOT/../shared/data" && pwd)"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
