#!/usr/bin/env bash
# The GPU measurements issue 5 still needs, as one device run (at most 8.7 minutes; H100/H200):
# where a training step syncs with the host, and bench at 224 px in bf16-mixed and 16-mixed.
#   device: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])   # results under $OUT
# .whl holds jsonargparse and its two dependencies (git-ignored): device images may lack them;
# in a fresh checkout: pip download jsonargparse docstring-parser typeshed-client --no-deps -d .whl
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
if ! python -c "import jsonargparse" 2>/dev/null; then
    pip install -q --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, lightning; print(torch.__version__, lightning.__version__)" > "$out/versions.txt"
for precision in bf16-mixed 16-mixed; do
    timeout 60 python benchmarks/gpu_sync_audit.py --precision "$precision" \
        > "$out/sync_$precision.txt" 2>&1
done
for precision in bf16-mixed 16-mixed; do
    # The bound is measured after every row (9 times): 1 s each is plenty at ~8,000 img/s.
    timeout 200 python benchmarks/bench.py --device cuda --image_size 224 --batch_size 64 \
        --images 2048 --epochs 3 --precision "$precision" --num_workers 12 --bound_seconds 1 \
        --output "$out/bench_$precision.md" > "$out/bench_$precision.log" 2>&1
done
tail -n 3 "$out"/sync_*.txt "$out"/bench_*.log
