#!/usr/bin/env bash
# GPU session check for the speed work (issue 7). Run from anywhere on a machine with a CUDA GPU:
#
#   bash test/gpu_check.sh            # results in build/gpu/ (or $OUT when set, e.g. the device tool's)
#
# 1. the full FetalCLIPSEG model (ViT-L/14, random weights) on one 840-frame replica case with our
#    defaults on CUDA (dense scan, fp16 or bf16 autocast, LoRA merged, batch 32) against the fp32
#    paper-style reference, same GPU, same process: case seconds, frames/s, CUDA peak memory, and the
#    encoder's time against its compute floor (T4 65 TFLOP/s fp16, H200 ~790 TFLOP/s bf16; target <= 3x);
# 2. the same with torch.compile (warm-up compile time not counted: the benchmark warms up first);
# 3. batch 64, to see whether the default batch leaves throughput on the table;
# 4. the coarse-to-fine search on the GPU (stride 4), which the CPU uses by default.
# Then prints one line per run. About 2-4 minutes on an H200 (case generation is most of it).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 2

run() {  # name, extra args...
    local name=$1; shift
    echo "=== $name: $*"
    timeout 900 "$PY" -m algorithm.benchmark --config full --device cuda --json "$OUT/$name.json" "$@" \
        > "$OUT/$name.log" 2>&1 || echo "$name failed (exit $?), see $OUT/$name.log"
    tail -n 25 "$OUT/$name.log"
}
run full_cuda
run full_cuda_compile --compile --no-flops
run full_cuda_batch64 --batch-size 64 --no-flops
run full_cuda_coarse4 --coarse-stride 4 --no-flops

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    f = r.get("flops") or {}
    print(f"{path.stem:22s} {r['device_name']}: case {r['seconds']:.2f} s ({r['frames_per_second']:.0f} frames/s), "
          f"reference {r['reference_seconds']:.2f} s, speed-up {r['speedup_vs_reference']:.1f}x, same frame "
          f"{r['same_frame_as_reference']}, encoded {r['frames_encoded']}/{r['frames']}, CUDA peak "
          f"{r['memory']['cuda_max_allocated_mb']} MiB"
          + (f", encoder {f['encoder_vs_floor']}x its floor ({f['encoder_floor_s']} s)" if f.get("encoder_vs_floor") else ""))
PYEOF
