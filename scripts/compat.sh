#!/usr/bin/env bash
# The supported-versions matrix, measured: for each environment named below, build a throwaway venv with
# those versions of torch, transformers, accelerate, lmms-eval and ray (every other package at the newest
# release they allow), run the family, golden-mask, CLI, Ray and lmms-eval tests there, and write the table
# to benchmarks/results/compat.md. pyproject.toml's lower bounds are the "lowest" row.
#
#   bash scripts/compat.sh                 # lowest and newest
#   bash scripts/compat.sh newest          # one environment (the table then holds that row only)
#   COMPAT_KEEP=1 bash scripts/compat.sh   # keep the environments (their paths are printed) to look into a failure
#
# Torch builds other than 2.13.0 come from PyPI as CUDA builds (several GB each, deleted afterwards); the
# tests run on the CPU. compressed-tensors (dev extra) needs torch >= 2.10, so these environments leave it
# out and its two tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# name: torch transformers accelerate lmms-eval ray
declare -A ENVS=(
  [lowest]="2.8.0 5.24.0 1.2.0 0.7.3 2.40.0"
  [newest]="2.15.0 5.25.0 1.16.0 0.7.3 2.60.0"
)
TESTS=(tests/test_families.py tests/test_families_c.py                       # every family: replay, probe, prune, save
       tests/test_masks_and_scores.py tests/test_engine.py tests/test_engine_speedups.py tests/test_pools.py
       tests/test_tamp.py tests/test_allocation.py                            # masks against references and by hand
       tests/test_cli.py tests/test_prune_cli.py tests/test_probe_cli.py tests/test_eval_cli.py   # the CLI
       tests/test_ray_executor.py tests/test_lmms_bridge.py tests/test_lmms_runs.py)           # ray, lmms-eval

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(lowest newest)
rows=()
details=()
for name in "${names[@]}"; do
  [ -n "${ENVS[$name]:-}" ] || { echo "compat.sh: unknown environment $name (one of ${!ENVS[*]})" >&2; exit 2; }
  read -r torch transformers accelerate lmms ray <<< "${ENVS[$name]}"
  work=$(mktemp -d)
  printf 'torch==%s\ntransformers==%s\naccelerate==%s\nlmms-eval==%s\nray==%s\n' \
    "$torch" "$transformers" "$accelerate" "$lmms" "$ray" > "$work/constraints.txt"
  echo "== $name: torch $torch, transformers $transformers, accelerate $accelerate, lmms-eval $lmms, ray $ray"
  start=$(date +%s)
  (
    # PIP_CONSTRAINT replaces a machine-wide constraints file (this workplace caps torch at what lies on disk)
    export PIP_CONSTRAINT="$work/constraints.txt"
    python3 -m venv "$work/venv"
    . "$work/venv/bin/activate"
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet "torch==$torch"
    python -m pip install --quiet -e ".[ray,lmms-core]" pytest "tokenizers>=0.22"
    python -m pip install --quiet --no-deps "lmms-eval==$lmms"
  ) > "$work/install.log" 2>&1 || { tail -n 20 "$work/install.log" >&2; rows+=("| $name | $torch | $transformers | $accelerate | $lmms | $ray | install failed | | | |"); rm -rf "$work"; continue; }
  installed=$(date +%s)
  set +e
  "$work/venv/bin/python" -m pytest -q -p no:cacheprovider -rfE "${TESTS[@]}" > "$work/tests.log" 2>&1
  set -e
  end=$(date +%s)
  summary=$(grep -E '^=*\s*[0-9]+ (passed|failed)' "$work/tests.log" | tail -n 1 | sed -E 's/=//g; s/ in [0-9.]+s.*//; s/^ +//')
  failures=$(grep -E '^(FAILED|ERROR) ' "$work/tests.log" | cut -c1-220 || true)
  count() { grep -oE "[0-9]+ $1" <<< "$summary" | grep -oE '[0-9]+' || echo 0; }
  passed=$(count passed); skipped=$(count skipped)
  failed=$(( $(count failed) + $(count 'errors?') ))
  rows+=("| $name | $torch | $transformers | $accelerate | $lmms | $ray | ${passed:-0} | ${failed:-0} | ${skipped:-0} | $(( (installed - start + 30) / 60 )) + $(( (end - installed + 30) / 60 )) |")
  echo "   $summary"
  if [ -n "$failures" ]; then
    details+=("" "Failures in \`$name\`:" "" "$(sed 's/^/- /' <<< "$failures")")
  fi
  if [ -n "${COMPAT_KEEP:-}" ]; then echo "   kept: $work"; else rm -rf "$work"; fi
done

{
  echo "# Supported versions, measured"
  echo
  echo "Written by \`bash scripts/compat.sh\` on $(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') ($(nproc) CPU cores, Python $(python3 -c 'import sys; print(sys.version.split()[0])')). Each row is a"
  echo "fresh environment with these versions; every other package is the newest release they allow. Tests run:"
  echo "the family tests (replay, probe, prune, save of every family the installed transformers has; the others"
  echo "skip), the masks against references and by hand, the CLI, the Ray executor and the lmms-eval bridge."
  echo "The pinned stack that CI tests is \`constraints.txt\`."
  echo
  echo "| environment | torch | transformers | accelerate | lmms-eval | ray | passed | failed | skipped | minutes (install + tests) |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  printf '%s\n' "${details[@]}"
} > "$root/benchmarks/results/compat.md"
cat "$root/benchmarks/results/compat.md"
