#!/usr/bin/env bash
# GPU readiness in one run (under 8 minutes on one GPU): the `gpu` tests (prune with Wanda and ATV, probe and
# evaluate a tiny model on CUDA against the CPU), then the prune-speed benchmark at Qwen2-VL-7B width on CUDA.
# Writes benchmarks/results/gpu_check.json (no machine paths).
#
#   bash benchmarks/gpu_check.sh                 # first visible GPU
#   DEVICE=cuda:1 LAYERS=2 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda:0}
LAYERS=${LAYERS:-4}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')"

start=$(date +%s)
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py --junitxml="$SCRATCH/gpu.xml"
tests_rc=$?
set -e
tests_seconds=$(( $(date +%s) - start ))

"$PYTHON" benchmarks/prune_speed.py --synthetic qwen2_vl --width 7b --layers "$LAYERS" --device "$DEVICE" \
    --dtype bfloat16 --nsamples 8 --methods magnitude wanda atv sparsegpt --out "$SCRATCH/speed.json"

"$PYTHON" - "$SCRATCH" "$tests_rc" "$tests_seconds" <<'PY'
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

scratch, rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
suite = ET.parse(scratch / "gpu.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
speed = json.loads((scratch / "speed.json").read_text())
speed["setup"].pop("out", None)
out = Path("benchmarks/results/gpu_check.json")
out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "tests": {**counts, "exit_code": rc, "seconds": seconds}, "prune_speed": speed}, indent=2))
print(f"gpu tests: {counts} (exit {rc}); written to {out}")
sys.exit(rc)
PY
