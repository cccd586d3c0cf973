#!/usr/bin/env bash
# Install the test stack into the active Python environment (a venv): the CPU torch, the project with the
# extras the tests use (dev, ray, lmms-core, docs) and lmms-eval without its declared dependencies (they include
# torchvision, which would replace the CPU torch).
#
#   bash scripts/setup_env.sh                   # the verified stack: every version from constraints.txt
#   bash scripts/setup_env.sh --constraints F   # another constraints file (scripts/compat.sh's environments)
#   bash scripts/setup_env.sh --newest          # the newest releases pyproject.toml allows (scripts/lock.sh)
#
# torch comes first and explicitly, so that no package pulls a multi-GB CUDA build: the version named in the
# constraints file (2.13.0, a CPU build that installs from a file on disk on the project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=constraints.txt
while [ $# -gt 0 ]; do
  case "$1" in
    --constraints) constraints="$2"; shift 2 ;;
    --newest) constraints=""; shift ;;
    *) echo "setup_env.sh: unknown argument $1 (use --constraints FILE or --newest)" >&2; exit 2 ;;
  esac
done
pin=()
torch_spec="torch==2.13.0"
lmms_spec="lmms-eval==0.7.3"
if [ -n "$constraints" ]; then
  [ -f "$constraints" ] || { echo "setup_env.sh: no constraints file $constraints" >&2; exit 2; }
  pin=(-c "$constraints")
  line=$(grep -iE '^torch==' "$constraints" | head -n 1 || true)
  [ -n "$line" ] && torch_spec=${line%%+*}   # torch==2.13.0+cpu -> torch==2.13.0 (the local build tag is pip's)
  line=$(grep -iE '^lmms[-_]eval==' "$constraints" | head -n 1 || true)
  [ -n "$line" ] && lmms_spec=$line
fi
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${pin[@]}" "$torch_spec"
python -m pip install --quiet "${pin[@]}" -e ".[dev,ray,lmms-core,docs]"
python -m pip install --quiet "${pin[@]}" --no-deps "$lmms_spec"
