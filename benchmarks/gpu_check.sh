#!/usr/bin/env bash
# The single command to run on a machine with CUDA: the CUDA tests, a short run of every stage at 32x32 and
# 64x64 with the time of each stage, the UNet benchmark in bf16 and fp32, with channels_last and compiled (img/s,
# peak memory, against diffusers when it is installed) and,
# with GPU_CHECK_SUITE=1, the whole test suite. Prints everything; writes gpu_check/ (or $GPU_CHECK_OUT).
#   bash benchmarks/gpu_check.sh            (from the repository root, in an environment with torch + CUDA)
set -uo pipefail
out=${GPU_CHECK_OUT:-gpu_check}
py=${PYTHON:-$(command -v python || command -v python3)}
mkdir -p "$out"
stamp() { while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done; }   # time of each printed line
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if [ "${GPU_CHECK_SUITE:-0}" = 1 ]; then      # the whole suite on the CPU cores while the GPU checks run
  (timeout 300 "$py" -m pytest -q -p no:cacheprovider -n 6 --ignore=tests/test_notebooks.py tests \
      > "$out/suite.txt" 2>&1; echo "suite exit $?" >> "$out/suite.txt") &
  suite=$!
fi

"$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt"

# every stage, short: base 200 steps, losses (32 draws each), groups, head 200 steps, evaluation, on a
# 4,000-image set (the preset's 20,000 make the losses stage alone a few minutes)
for res in 32 64; do
  start=$SECONDS
  timeout "${GPU_CHECK_RUN_TIMEOUT:-600}" "$py" train.py --preset gpu --device cuda --resolution "$res" \
      --steps 200 --head-steps 200 --num-samples "${GPU_CHECK_SAMPLES:-4000}" --out "$out/run$res" \
      --overwrite --no-progress 2>&1 | stamp > "$out/run$res.txt"
  echo "run$res: exit ${PIPESTATUS[0]} in $((SECONDS - start)) s"
  grep -E "^.{9}(\[|  (base|invdiff))|Bias|done in" "$out/run$res.txt" || tail -20 "$out/run$res.txt"
  "$py" benchmarks/stage_times.py "$out/run$res" --json "$out/stage_times$res.json"   # per stage, from the files
done
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
for res in (32, 64):
    f = Path(sys.argv[1]) / f"run{res}" / "summary.json"
    if f.is_file():
        s = json.loads(f.read_text())
        print(res, {k: (round(s[k]["bias"], 3), round(s[k]["fidelity"], 3)) for k in ("base", "invdiff") if k in s})
    else:
        print(res, "no summary.json")
PY

[ -n "${suite:-}" ] && { wait "$suite"; tail -15 "$out/suite.txt"; }
for precision in bf16 fp32; do
  "$py" benchmarks/unet_speed.py --preset gpu --device cuda --batch 128 --repeats 20 --precision "$precision" \
      --json "$out/unet_speed_$precision.json"
done
# the launch-bound remedies, both models alike: channels_last, then torch.compile (bf16)
"$py" benchmarks/unet_speed.py --preset gpu --device cuda --batch 128 --repeats 20 --precision bf16 \
    --channels-last --json "$out/unet_speed_bf16_channels_last.json"
timeout 300 "$py" benchmarks/unet_speed.py --preset gpu --device cuda --batch 128 --repeats 20 --precision bf16 \
    --compile --json "$out/unet_speed_bf16_compile.json"
