"""Model-level benchmark: prefill / decode (HF generate and dijiang.fast_decode) / memory / training throughput,
teacher vs converted (pure and window hybrid). Same as `dijiang bench`; see docs/bench_model.md.

GPU (the report in docs/):  python benchmarks/bench_model.py --model smollm2 --keep-going --out docs/bench_model.md --overwrite
CPU smoke run (seconds):    python benchmarks/bench_model.py --model tiny --contexts 32,64 --batches 1,2 \
                                --batch-contexts 32 --new-tokens 8 --hf-new-tokens 4 --train-contexts 32 \
                                --train-tokens 64 --repeats 1 --out /tmp/bench.md
"""
import sys

from dijiang.bench import main

if __name__ == "__main__":
    sys.exit(main())
