#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a lent GPU machine (a session's device time is short):
#   1. the tests marked gpu (CUDA merges against the CPU, device budgets, the CUDA unpack's price, bitsandbytes and
#      onnxruntime-gpu where installed; the others skip with their reason);
#   2. bench/gpu.py: the covariance rules on 7B-shaped layers, CUDA against the CPU (time, device peak, agreement);
#   3. bench/polar_routes.py --device cuda: the eigh-route polar factor against Newton–Schulz on the GPU.
# Run from the repository root (with .venv/bin/python where `make setup` made it, else python3, the device image's
# torch with CUDA; lowmerge runs from the tree either way):
#   bash bench/gpu_check.sh            # logs and results under $OUT (the device tool's folder), else bench/_work/gpu
# Each step has its own time limit (GPU_CHECK_LIMITS="tests gpu polar", seconds) so that one slow step leaves the
# others their time; the whole run stays under ten minutes. The results files come back for bench/RESULTS.md.
set -u
out=${OUT:-bench/_work/gpu}
mkdir -p "$out"
read -r t_tests t_gpu t_polar <<< "${GPU_CHECK_LIMITS:-180 270 80}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}   # make setup's, else the machine's

"$py" - <<'EOF' 2>&1 | tee "$out/env.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
none = "none: the gpu tests skip, gpu.py measures the CPU alone, polar_routes refuses"
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else none)
EOF

echo "== 1. tests marked gpu (limit ${t_tests} s)"
timeout "$t_tests" "$py" -m pytest -q -m gpu -p no:cacheprovider -n 4 tests 2>&1 | tee "$out/pytest-gpu.log" | tail -25
echo "== 2. bench/gpu.py (limit ${t_gpu} s)"
timeout "$t_gpu" "$py" bench/gpu.py --layers 1 --methods actmat,wudi_cfs --results "$out/RESULTS-gpu.md" \
    > "$out/gpu.log" 2>&1; echo "exit $?"; tail -20 "$out/gpu.log"
echo "== 3. bench/polar_routes.py --device cuda (limit ${t_polar} s)"
timeout "$t_polar" "$py" bench/polar_routes.py --device cuda --results "$out/RESULTS-gpu.md" \
    > "$out/polar.log" 2>&1; echo "exit $?"; tail -16 "$out/polar.log"
