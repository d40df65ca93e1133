#!/usr/bin/env bash
# Runs the lint and the whole test suite (sets up .venv on first use).
#   bash scripts/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "ruff check" >&2
ruff check deepexit_jax tests experiments
python -m pytest tests "$@"
