#!/usr/bin/env bash
# Refresh constraints.txt, the stack .ci/run tests: build a throwaway venv with the newest releases
# pyproject.toml allows, run the test suite in it, and only if it passes write its exact versions.
#
#   bash scripts/lock.sh            # then commit constraints.txt (and say in the commit what moved)
#   bash scripts/lock.sh --no-tests # write the lock without running the suite (to look at what would move)
set -euo pipefail
cd "$(dirname "$0")/.."
run_tests=1
[ "${1:-}" = "--no-tests" ] && run_tests=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
bash scripts/setup_env.sh --newest
if [ "$run_tests" = 1 ]; then
  python -m ruff check .
  python -m pytest -q -p no:cacheprovider
fi
{
  echo "# The verified test stack: exact versions of every package in the environment .ci/run tests (CPU torch"
  echo "# included). Used as pip constraints by scripts/setup_env.sh (.ci/run and the README's test command)."
  echo "# Refresh: bash scripts/lock.sh   (newest releases pyproject.toml allows, full suite, then this file)"
  echo "# Written $(date -u +%Y-%m-%d) with $(python --version)."
  python -m pip freeze --exclude-editable | LC_ALL=C sort -f
} > "$work/constraints.txt"
mv "$work/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages; git diff constraints.txt shows what moved"
