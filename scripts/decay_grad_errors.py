"""How far the fused kernel's d log_decay error runs over the plain torch path's (same bf16 inputs), over 40 random
draws of tests/test_triton_ops.py's state-in/out case (dijiang.ops.testing.check_fused): the evidence behind that test's decay_ratio. CUDA only.
"decay" is the error on one (do, dS) draw; where it is over 2%, _check also gives the RMS errors of the kernel and
of the torch path over 8 more draws ("decay_rms", "torch_rms"), which the test compares.

    python scripts/decay_grad_errors.py
"""
import json

from dijiang.ops.testing import check_fused

rows = []
for seed in range(40):
    for normalize in (False, True):
        try:
            e = check_fused(1, 333, 2, 64, 64, 64, normalize=normalize, init=True, final=True, seed=seed, decay_ratio=1e9)
        except AssertionError as exc:
            rows.append({"seed": seed, "normalize": normalize, "error": str(exc)[:200]}); continue
        rows.append({"seed": seed, "normalize": normalize, "decay": e["dlog_decay"], "decay_rms": e.get("dlog_decay_rms"),
                     "torch_rms": e.get("dlog_decay_torch_path_rms"),
                     "max_other": max(v for k, v in e.items() if not k.startswith("dlog_decay"))})
print(json.dumps(rows))
r = [x["decay_rms"] / x["torch_rms"] for x in rows if x.get("torch_rms")]
print("RMS ratios over the torch path (draws over 2%):", sorted(round(v, 2) for v in r))
print("decay errors:", sorted(round(x["decay"], 4) for x in rows if "decay" in x))
