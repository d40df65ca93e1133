#!/usr/bin/env bash
# Runs the lint and the whole test suite (sets up .venv on first use).
#   bash scripts/test.sh               every test file, each in its own Python process
#   bash scripts/test.sh [pytest args] one pytest run with these arguments
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "ruff check" >&2
ruff check deepexit_jax tests experiments
if [[ $# -gt 0 ]]; then
  exec python -m pytest "$@"
fi
# One process per test file: in one process for the whole suite, XLA:CPU (jax 0.10.2)
# segfaulted while compiling a training step late in the run, three runs out of three,
# though every file passes alone (BUILD_NOTES.md, Build, test, benchmark).
passed=0 failed=0 skipped=0 errors=0 status=0
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for file in tests/test_*.py; do
  echo "== $file" >&2
  set +e
  python -m pytest "$file" -p no:cacheprovider 2>&1 | tee "$log"
  rc="${PIPESTATUS[0]}"
  set -e
  summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$log" | tail -1 || true)"
  for kind in passed failed skipped error; do
    n="$(grep -oE "[0-9]+ $kind" <<<"$summary" | grep -oE '[0-9]+' || true)"
    case "$kind" in
      passed) passed=$((passed + ${n:-0})) ;;
      failed) failed=$((failed + ${n:-0})) ;;
      skipped) skipped=$((skipped + ${n:-0})) ;;
      error) errors=$((errors + ${n:-0})) ;;
    esac
  done
  if [[ "$rc" != 0 && "$rc" != 5 ]]; then
    echo "error: $file exited with status $rc" >&2
    status=1
    [[ -z "$summary" ]] && failed=$((failed + 1))  # A crash prints no summary.
  fi
done
failed=$((failed + errors))
echo "$passed passed, $failed failed, $skipped skipped"
exit "$status"
