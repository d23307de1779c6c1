"""Probe the fused DiJiang kernel on CUDA at head sizes the dispatcher refuses there (d, m, dv in 16 / 32): one
subprocess per case (an illegal memory access ends its CUDA context), each checked by dijiang.ops.testing.check_fused
(as tests/test_triton_ops.py does) against the float64 reference. Prints one line per case. CUDA only.

    python scripts/probe_small_dims.py
"""
import json
import subprocess
import sys
from pathlib import Path

CASES = [(16, 16, 16, 333), (16, 16, 16, 4096), (32, 32, 32, 333), (32, 32, 32, 4096), (64, 64, 16, 333),
         (64, 64, 16, 4096), (64, 64, 32, 4096), (16, 64, 64, 4096)]

CHILD = """
import sys, json
from dijiang.ops.testing import check_fused
from dijiang.ops import triton_dijiang as tdj
tdj.GPU_DIMS = (16, 32, 64, 128)
d, m, dv, T = (int(x) for x in sys.argv[1:5])
out = {}
for normalize in (False, True):
    try:
        e = check_fused(1, T, 2, d, m, dv, normalize=normalize, init=True, final=True, seed=7)
        out[str(normalize)] = {k: round(v, 5) for k, v in e.items()}
    except AssertionError as exc:
        out[str(normalize)] = "FAIL " + str(exc)[:300]
print(json.dumps(out))
"""


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    for d, m, dv, T in CASES:
        done = subprocess.run([sys.executable, "-c", CHILD, str(d), str(m), str(dv), str(T)], cwd=root,
                              capture_output=True, text=True, timeout=300)
        last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        result = last if done.returncode == 0 else f"rc={done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
        print(json.dumps({"d": d, "m": m, "dv": dv, "T": T}), result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
