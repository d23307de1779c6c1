#!/usr/bin/env bash
# GPU driver for the kernel and model benchmarks (run by the device tool in the repo root; results in $OUT).
# Stages are named by what they measure; each runs the GPU kernel tests first where it says so.
#   bash scripts/gpu_kernels.sh ops            GPU kernel tests, op benchmark with the window hybrid (window 128 and 64),
#                                              block-size tuning of the fused op
#   bash scripts/gpu_kernels.sh ops-profile    GPU tests, host/GPU profile (benchmarks/profile_host.py), fused and window
#                                              ops against SDPA 1k-64k eager and from CUDA graphs; d log_decay errors
#                                              over 40 draws (scripts/decay_grad_errors.py)
#   bash scripts/gpu_kernels.sh ops-graphs     GPU tests and the CUDA-graph op bench
#   bash scripts/gpu_kernels.sh sweep          the default op sweep (docs/bench_ops.md: both shapes, every method)
#   bash scripts/gpu_kernels.sh model          model bench on ~/model/hf (SmolLM2 converted): training tok/s with the
#                                              fused window path, pure decode at 128 and 256 new tokens, the step compile
#                                              scope, window-128 decode after the fused prefill
#   bash scripts/gpu_kernels.sh host-breakdown GPU tests, the per-piece host breakdown of one fused call, fused vs SDPA
#                                              at 2k-8k for both shapes
#   bash scripts/gpu_kernels.sh carry-ab       GPU tests, host breakdown, fused vs SDPA at 1k-8k eager and from CUDA
#                                              graphs with the in-kernel carry on and off (DIJIANG_INLINE_CARRY=0);
#                                              a 70 s limit per sweep
#   bash scripts/gpu_kernels.sh host-repeat    GPU tests, timestamps of one forward+backward, host breakdown, fused vs
#                                              SDPA 1k-8k eager three times (16 x 64) and once (32 x 128), from CUDA
#                                              graphs once, fused at 64k
#   bash scripts/gpu_kernels.sh model-decode   on ~/model/hf: per-step decode timings, pure decode at 128 and 256 new
#                                              tokens, the default compile mode, the full decode table, training tok/s
#                                              of teacher and pure
#   bash scripts/gpu_kernels.sh sink-decode    on ~/model/hf: the GPU tests of the fast decoder with sinks, then decode
#                                              tok/s of window-128 and the shipped recipe's layer (window-sinks: 124 + 4
#                                              sinks), every window layer on the PyTorch step (0) and on the kernel (1)
# A device call is limited to 10 minutes, so the model stages may need running one command at a time.
# Results are copied into docs/ by hand (docs/bench_*.md, docs/bench_data/).
set -uo pipefail
export PYTHONPATH=~/site:$PWD/src
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
stage=${1:?a stage: see the list above}
if [ "$stage" = ops ]; then
  nvidia-smi -L > "$OUT/device.txt"; python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/device.txt"
  timeout 240 python -m pytest -q -m gpu tests/test_triton_window.py tests/test_attention_gpu.py tests/test_triton_ops.py -k "window or converted or matches_reference or torch_path" 2>&1 | tail -40 > "$OUT/gpu_tests.txt"
  timeout 190 python benchmarks/bench_ops.py --methods sdpa,fused,window,window-fused --window 128 --shapes 16x64 \
    --torch-max 16384 --md "$OUT/bench_ops_window128.md" --png "$OUT/bench_ops_window128.png" \
    --json "$OUT/bench_ops_window128.json" > "$OUT/bench_ops_window128.log" 2>&1
  timeout 90 python benchmarks/bench_ops.py --methods sdpa,window-fused --window 64 --shapes 16x64 \
    --md "$OUT/bench_ops_window64.md" --png "$OUT/bench_ops_window64.png" \
    --json "$OUT/bench_ops_window64.json" > "$OUT/bench_ops_window64.log" 2>&1
  timeout 150 python benchmarks/bench_ops.py --tune > "$OUT/tune.txt" 2>&1
  tail -n 5 "$OUT"/*.log
  cat "$OUT/gpu_tests.txt"
elif [ "$stage" = ops-profile ]; then
  nvidia-smi -L > "$OUT/device.txt"; python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/device.txt"
  timeout 300 python -m pytest -q -m gpu tests/test_triton_ops.py tests/test_triton_window.py tests/test_attention_gpu.py \
    2>&1 | tail -30 > "$OUT/gpu_tests.txt"
  timeout 120 python benchmarks/profile_host.py --lengths 1024,2048,4096,8192 --out "$OUT/profile_host.txt" > /dev/null 2>&1
  timeout 150 python benchmarks/bench_ops.py --methods sdpa,fused,window-fused --window 128 --shapes 16x64 \
    --md "$OUT/bench_ops_launch.md" --png "$OUT/bench_ops_launch.png" --json "$OUT/bench_ops_launch.json" \
    > "$OUT/bench_ops_launch.log" 2>&1
  timeout 100 python scripts/decay_grad_errors.py > "$OUT/decay_grad_errors.txt" 2>&1
  timeout 150 python benchmarks/bench_ops.py --cuda-graphs --methods sdpa,fused,window-fused --window 128 --shapes 16x64 \
    --md "$OUT/bench_ops_graphs.md" --png "$OUT/bench_ops_graphs.png" --json "$OUT/bench_ops_graphs.json" \
    > "$OUT/bench_ops_graphs.log" 2>&1
  tail -n 3 "$OUT"/*.log; cat "$OUT/gpu_tests.txt"; head -12 "$OUT/profile_host.txt"; tail -2 "$OUT/decay_grad_errors.txt"
elif [ "$stage" = ops-graphs ]; then
  timeout 300 python -m pytest -q -m gpu tests/test_triton_ops.py tests/test_triton_window.py tests/test_attention_gpu.py \
    2>&1 | tail -30 > "$OUT/gpu_tests.txt"
  timeout 150 python benchmarks/bench_ops.py --cuda-graphs --methods sdpa,fused,window-fused --window 128 --shapes 16x64 \
    --md "$OUT/bench_ops_graphs.md" --png "$OUT/bench_ops_graphs.png" --json "$OUT/bench_ops_graphs.json" \
    > "$OUT/bench_ops_graphs.log" 2>&1
  tail -n 9 "$OUT/bench_ops_graphs.log"; tail -n 5 "$OUT/gpu_tests.txt"
elif [ "$stage" = sweep ]; then
  timeout 560 python benchmarks/bench_ops.py --md "$OUT/bench_ops.md" --png "$OUT/bench_ops.png" \
    --json "$OUT/bench_ops.json" > "$OUT/bench_ops.log" 2>&1
  tail -n 20 "$OUT/bench_ops.log"
elif [ "$stage" = host-breakdown ]; then
  timeout 300 python -m pytest -q -m gpu tests/test_triton_ops.py tests/test_triton_window.py tests/test_attention_gpu.py \
    2>&1 | tail -4
  python benchmarks/profile_host.py --breakdown-only --out "$OUT/host_breakdown.txt" > /dev/null 2>&1
  timeout 150 python benchmarks/bench_ops.py --methods sdpa,fused --shapes 16x64,32x128 --lengths 2048,4096,8192 \
    --md "$OUT/ops_short.md" --png "$OUT/ops_short.png" --json "$OUT/ops_short.json" > "$OUT/ops_short.log" 2>&1
  cat "$OUT/host_breakdown.txt"; tail -n 8 "$OUT/ops_short.log"
elif [ "$stage" = carry-ab ]; then
  nvidia-smi -L > "$OUT/device.txt"; python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/device.txt"
  timeout 300 python -m pytest -q -m gpu tests/test_triton_ops.py tests/test_triton_window.py tests/test_attention_gpu.py \
    2>&1 | tail -30 > "$OUT/gpu_tests.txt"
  tail -n 4 "$OUT/gpu_tests.txt"
  timeout 80 python benchmarks/profile_host.py --breakdown-only --out "$OUT/host_breakdown.txt" > /dev/null 2>&1
  short() {  # $1: file stem, then extra bench_ops options
    timeout 70 python benchmarks/bench_ops.py --shapes 16x64,32x128 --lengths 1024,2048,4096,8192 --no-write \
      --json "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1
  }
  short ops_eager --methods sdpa,fused
  DIJIANG_INLINE_CARRY=0 short ops_eager_nocarry --methods fused
  short ops_eager_again --methods sdpa,fused
  short ops_graphs --methods sdpa,fused --cuda-graphs
  DIJIANG_INLINE_CARRY=0 short ops_graphs_nocarry --methods fused --cuda-graphs
  timeout 60 python benchmarks/bench_ops.py --shapes 16x64,32x128 --lengths 65536 --methods fused --no-write \
    --json "$OUT/ops_64k.json" > "$OUT/ops_64k.log" 2>&1
  cat "$OUT/host_breakdown.txt"; for f in "$OUT"/ops_*.log; do echo "== $f"; tail -n 12 "$f"; done
elif [ "$stage" = host-repeat ]; then
  nvidia-smi -L > "$OUT/device.txt"; python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/device.txt"
  timeout 300 python -m pytest -q -m gpu tests/test_triton_ops.py tests/test_triton_window.py tests/test_attention_gpu.py \
    2>&1 | tail -30 > "$OUT/gpu_tests.txt"
  tail -n 2 "$OUT/gpu_tests.txt"
  { python benchmarks/profile_host.py --backward-path; python benchmarks/profile_host.py --breakdown-only; } \
    > "$OUT/host.txt" 2>&1
  ops() { timeout 100 python benchmarks/bench_ops.py --no-write "$@" 2>&1 | grep -v '^{'; }
  { for i in 1 2 3; do ops --shapes 16x64 --lengths 1024,2048,4096,8192 --methods sdpa,fused; done
    ops --shapes 32x128 --lengths 1024,2048,4096,8192 --methods sdpa,fused
    ops --shapes 16x64,32x128 --lengths 1024,2048,4096,8192 --methods sdpa,fused --cuda-graphs
    ops --shapes 16x64,32x128 --lengths 65536 --methods fused; } > "$OUT/ops.txt"
  cat "$OUT/host.txt" "$OUT/ops.txt"
elif [ "$stage" = model-decode ]; then
  bench() { timeout "$1" python benchmarks/bench_model.py --model ~/model/hf --keep-going "${@:2}"; }
  python benchmarks/decode_steps.py --model ~/model/hf --kind pure --context 2048 --steps 256 \
    --json "$OUT/decode_steps_pure.json" > "$OUT/decode_steps.log" 2>&1
  for n in 128 256; do
    bench 150 --kinds pure --contexts 2048 --batches 1 --new-tokens $n --hf-new-tokens 0 --train-contexts '' \
      --repeats 3 --json "$OUT/decode_pure_$n.json" --out "$OUT/decode_pure_$n.md" > "$OUT/decode_pure_$n.log" 2>&1
  done
  DIJIANG_COMPILE_MODE=default bench 150 --kinds pure --contexts 2048,32768 --batches 1 --new-tokens 128 \
    --hf-new-tokens 0 --train-contexts '' --repeats 3 --json "$OUT/decode_pure_default_mode.json" \
    --out "$OUT/decode_pure_default_mode.md" > "$OUT/decode_pure_default_mode.log" 2>&1
  bench 280 --kinds teacher,pure --contexts '' --batches 1 --train-contexts 2048,16384 --repeats 3 \
    --json "$OUT/train.json" --out "$OUT/train.md" > "$OUT/train.log" 2>&1
  bench 570 --kinds teacher,pure,window --window 128 --contexts 2048,8192,32768 --batches 1,16 --batch-contexts 8192 \
    --new-tokens 128 --hf-new-tokens 16 --train-contexts '' --repeats 2 --json "$OUT/decode.json" \
    --out "$OUT/decode.md" > "$OUT/decode.log" 2>&1
  rm -f "$OUT"/*.png
  tail -n 3 "$OUT"/*.log
elif [ "$stage" = sink-decode ]; then
  timeout 150 python -m pytest -q -m gpu tests/test_fast_decode.py -k "sink" 2>&1 | tail -n 20 > "$OUT/gpu_tests_sink_decode.txt"
  bench() { timeout "$1" python benchmarks/bench_model.py --model ~/model/hf --keep-going "${@:2}"; }
  for kernel in 0 1; do  # 0: every window layer on the compiled PyTorch step, 1 (the default): on the kernel, sinks too
    DIJIANG_WINDOW_DECODE_KERNEL=$kernel bench 200 --kinds window,window-sinks --window 128 --contexts 2048,8192 \
      --batches 1,16 --batch-contexts 8192 --new-tokens 128 --hf-new-tokens 0 --train-contexts '' --repeats 2 \
      --json "$OUT/decode_sinks_kernel_$kernel.json" --out "$OUT/decode_sinks_kernel_$kernel.md" \
      > "$OUT/decode_sinks_kernel_$kernel.log" 2>&1
  done
  rm -f "$OUT"/*.png
  tail -n 5 "$OUT/gpu_tests_sink_decode.txt"; tail -n 3 "$OUT"/*.log
elif [ "$stage" = model ]; then
  bench() { timeout "$1" python benchmarks/bench_model.py --model ~/model/hf --keep-going "${@:2}"; }
  bench 420 --kinds teacher,pure,window --window 128 --contexts '' --batches 1 --train-contexts 2048,16384 \
    --repeats 3 --json "$OUT/train.json" --out "$OUT/train.md" > "$OUT/train.log" 2>&1
  bench 100 --kinds pure --contexts '' --batches 1 --train-contexts 2048,16384 --repeats 5 \
    --json "$OUT/train_pure.json" --out "$OUT/train_pure.md" > "$OUT/train_pure.log" 2>&1
  for n in 128 256; do
    bench 150 --kinds pure --contexts 2048,32768 --batches 1 --new-tokens $n --hf-new-tokens 0 --train-contexts '' \
      --repeats 3 --json "$OUT/decode_pure_$n.json" --out "$OUT/decode_pure_$n.md" > "$OUT/decode_pure_$n.log" 2>&1
  done
  DIJIANG_COMPILE_SCOPE=step bench 170 --kinds pure --contexts 2048,32768 --batches 1 --new-tokens 128 \
    --hf-new-tokens 0 --train-contexts '' --repeats 3 --json "$OUT/decode_pure_step.json" \
    --out "$OUT/decode_pure_step.md" > "$OUT/decode_pure_step.log" 2>&1
  bench 170 --kinds window --window 128 --contexts 2048,32768 --batches 1 --new-tokens 128 --hf-new-tokens 16 \
    --train-contexts '' --repeats 2 --json "$OUT/decode_window128_fusedprefill.json" \
    --out "$OUT/decode_window128_fusedprefill.md" > "$OUT/decode_window128_fusedprefill.log" 2>&1
  rm -f "$OUT"/*.png  # the device tool returns a limited number of files: keep JSON, tables and logs
  tail -n 3 "$OUT"/*.log
fi
