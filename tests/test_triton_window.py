"""GPU tests of the fused window hybrid (banded softmax kernel + fused DiJiang chunk kernel) against the
PyTorch window op in float32. Skipped without CUDA; tests/test_triton_interpret.py runs the same kernels
under the Triton interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dijiang.ops import window_attention
from dijiang.ops.triton_dijiang import dijiang_feature_map
from dijiang.ops.testing import rel_err as rel, run_window, window_inputs
from dijiang.ops.triton_window import fused_window_attention

def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@gpu
@pytest.mark.parametrize("T,W,sinks", [(1000, 64, 0), (777, 128, 0), (100, 128, 0), (4096, 128, 0), (4096, 124, 4),
                                       (1000, 64, 40)])
def test_bf16_matches_float32_torch_op(T, W, sinks):
    inputs = window_inputs(1, T, 4, 64, torch.bfloat16, seed=T)
    o1, s1, g1 = run_window(True, *inputs, W, sinks=sinks)
    o2, s2, g2 = run_window(False, *inputs, W, upcast=True, sinks=sinks)  # the same bf16 inputs, computed in float32
    assert rel(o1, o2) < 1e-2
    for name, a, b in zip(["q", "k", "v", "log_weight", "decay", "mix"], g1, g2):
        assert rel(a, b) < 3e-2, name
    assert rel(s1["S"], s2["S"]) < 1e-2
    for key in ("k", "v", "kf") + (("sink_k", "sink_v") if sinks else ()):
        assert rel(s1[key].float(), s2[key].float()) < 1e-2, key
    for key in ("mask", "sink_mask") if sinks else ("mask",):
        assert bool((s1[key] == s2[key]).all()), key


@gpu
@pytest.mark.parametrize("T", [2048, 8192])
def test_per_token_decay_bf16_matches_float32_torch_op(T):
    """A data-dependent decay (the chunk kernel's TOK mode): its gradient, per-head decay included, must not drift
    with T in bf16 (heads from fast to slow decay)."""
    inputs = window_inputs(1, T, 3, 64, torch.bfloat16, seed=5)
    gate = (0.1 * torch.randn(3, 64, generator=torch.Generator().manual_seed(6))).cuda().requires_grad_()
    o1, s1, g1 = run_window(True, *inputs, 124, sinks=4, gate=gate)
    o2, s2, g2 = run_window(False, *inputs, 124, upcast=True, sinks=4, gate=gate)
    assert rel(o1, o2) < 1e-2 and rel(s1["S"], s2["S"]) < 1e-2
    for name, a, b in zip(["q", "k", "v", "log_weight", "decay", "mix", "gate"], g1, g2):
        assert rel(a, b) < 3e-2, name


@gpu
@pytest.mark.parametrize("sinks", [0, 4])
def test_float32_tight(sinks):
    inputs = window_inputs(2, 600, 2, 64, torch.float32, seed=3)
    o1, s1, g1 = run_window(True, *inputs, 100, sinks=sinks)
    o2, s2, g2 = run_window(False, *inputs, 100, sinks=sinks)
    # the fused chunk kernel's feature-map matmul x @ P is tf32 (H100: o 3.2e-4 off)
    assert rel(o1, o2) < 1e-3
    for a, b in zip(g1, g2):
        assert rel(a, b) < 3e-3
    assert rel(s1["S"], s2["S"]) < 3e-3  # H100: 1.1e-3


@gpu
def test_prefill_state_continues_like_one_call():
    """Fused prefill, then the PyTorch op from its state, equals the PyTorch op over everything."""
    q, k, v, proj, log_weight, decay_raw, mix_raw = window_inputs(1, 700, 2, 64, torch.float32, seed=11)
    W, split = 64, 500
    args = (F.logsigmoid(decay_raw).detach(), F.softplus(mix_raw).detach())
    fs = 64**-0.5
    with torch.no_grad():
        qf, kf = dijiang_feature_map(q, proj, log_weight, fs), dijiang_feature_map(k, proj, log_weight, fs)
        whole, _ = window_attention(q, k, v, qf, kf, *args, window=W, mode="chunk")
        head, state = fused_window_attention(q[:, :split], k[:, :split], v[:, :split], proj, log_weight, *args,
                                             window=W, output_final_state=True)
        tail, _ = window_attention(q[:, split:], k[:, split:], v[:, split:], qf[:, split:], kf[:, split:], *args,
                                   window=W, mode="recurrent", initial_state=state)
    assert rel(torch.cat([head, tail], dim=1), whole) < 2e-3  # tf32 feature map in the kernel (H100: 5.0e-4)


def test_refuses_cpu_tensors_without_the_interpreter():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="cannot run"):
        fused_window_attention(q, q, q, torch.randn(16, 16), None, -torch.ones(2), torch.ones(2), window=4)


def test_bad_shapes_raise():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="lin_weight"):
        fused_window_attention(q, q, q, torch.randn(16, 16), None, -torch.ones(2), torch.ones(3), window=4)
    with pytest.raises(ValueError, match="window"):
        fused_window_attention(q, q, q, torch.randn(16, 16), None, -torch.ones(2), torch.ones(2), window=0)
    with pytest.raises(ValueError, match="log_decay must have shape"):
        fused_window_attention(q, q, q, torch.randn(16, 16), None, -torch.ones(1, 7, 2), torch.ones(2), window=4)
    with pytest.raises(ValueError, match="do not match"):
        fused_window_attention(q, q[:, :4], q, torch.randn(16, 16), None, -torch.ones(2), torch.ones(2), window=4)
    with pytest.raises(ValueError, match="needs its projection"):  # only the band alone (linear=False) goes without
        fused_window_attention(q, q, q, None, None, -torch.ones(2), torch.ones(2), window=4)
