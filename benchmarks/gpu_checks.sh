#!/usr/bin/env bash
# The GPU checks of issue 17 in one short script, as run on a lent GPU machine (python3 with torch + CUDA;
# nnsight and its needs installed beforehand). Writes its logs to $OUT (default runs/gpu-checks).
#   1. the device-map, half-precision, remote-local and compiled-VAR tests with CUDA present (their CUDA cases run:
#      a CUDA/CPU layer split equals one device; bfloat16/float16 on the GPU agree with float32; the scan's
#      histogram median is exact on CUDA; the scan's queued copies give the tables synchronous copies give; the head
#      and contribution tables, and ablation's, patching's and the ViT-sink reducers' results, on CUDA equal the CPU's);
#   2. the CLI end to end on the GPU: scan and var-eval of the organism in bfloat16;
#   3. benchmarks/real_size.py at full depth in float16: LLaVA-1.5-7B (32 layers), Qwen2-VL-7B (28 layers),
#      VAR unfused and compiled (--compile).
# Worst case 150 + 2 x 45 + 180 + 150 = 570 s, inside the device tool's 600 s per call (logs are written as they
# come, so a run cut short still returns what it did).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
OUT="${OUT:-runs/gpu-checks}"; mkdir -p "$OUT"
PY="${PY:-python3}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, nnsight; print('torch', torch.__version__, 'transformers', transformers.__version__, 'nnsight', nnsight.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_device_map.py tests/test_half_precision.py \
    tests/test_remote.py tests/test_var.py::test_compiled_var_on_a_tiny_llava \
    "tests/test_measures.py::test_row_median_abs_is_the_exact_median_over_each_rows_valid_entries" \
    tests/test_scan.py::test_tables_later_on_cuda_equal_the_immediate_tables \
    tests/test_reducer_tables.py::test_head_and_contribution_tables_on_cuda_equal_those_on_the_cpu \
    tests/test_reducer_tables.py::test_sink_aware_reducers_on_cuda_equal_those_on_the_cpu \
    2>&1 | tee "$OUT/tests.txt" | tail -12
cli() { timeout 45 $PY -c "from sinkscope.cli import app; app()" "$@"; }
{ cli scan --model organism --device cuda --dtype bfloat16 --limit 8 --calibration 8 --out /tmp/gpu-scan &&
  head -3 /tmp/gpu-scan/sink_summary.csv && cat /tmp/gpu-scan/sink_dims.json &&
  cli var-eval --model organism --device cuda --dtype bfloat16 --limit 16 --calibration 8 --out /tmp/gpu-var &&
  ls /tmp/gpu-var; } 2>&1 | tee "$OUT/cli.txt" | tail -8
timeout 180 $PY benchmarks/real_size.py --family llava --layers 32 --dtype float16 --device cuda --repeats 10 \
    --new-tokens 16 --samples 10 --compile 2>&1 | tee "$OUT/real_size_llava.txt"
timeout 150 $PY benchmarks/real_size.py --family qwen2_vl --layers 28 --dtype float16 --device cuda --repeats 10 \
    --new-tokens 16 --samples 10 --compile 2>&1 | tee "$OUT/real_size_qwen2_vl.txt"
