#!/usr/bin/env bash
# The single command to run on a machine with CUDA: CUDA tests, a short run of every stage at 32x32 and 64x64,
# and the UNet benchmark in bf16 (img/s, peak memory). Prints everything; writes gpu_check/ in the cwd.
#   bash benchmarks/gpu_check.sh            (from the repository root, in the installed venv)
set -euo pipefail
out=${GPU_CHECK_OUT:-gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/tests.txt"
for res in 32 64; do
  /usr/bin/time -v python train.py --preset gpu --device cuda --resolution "$res" --steps 200 --head-steps 200 \
      --out "$out/run$res" --overwrite --no-progress 2>&1 | tee "$out/run$res.txt" \
      | grep -E "^\[|Bias|done in|Maximum resident|^  (base|invdiff)" || true
done
python - "$out" <<'PY'
import json, sys, torch
from pathlib import Path
for res in (32, 64):
    s = json.loads((Path(sys.argv[1]) / f"run{res}" / "summary.json").read_text())
    print(res, {k: (round(s[k]["bias"], 3), round(s[k]["fidelity"], 3)) for k in ("base", "invdiff") if k in s})
PY
for precision in bf16 fp32; do
  python benchmarks/unet_speed.py --preset gpu --device cuda --batch 128 --repeats 20 --precision "$precision" \
      --json "$out/unet_speed_$precision.json"
done
