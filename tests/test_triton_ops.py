"""GPU tests of the fused Triton DiJiang attention against a plain float64 quadratic reference.

Skipped without CUDA (CI). Run on a GPU machine: ``pytest -m gpu tests/test_triton_ops.py``.
"""

from __future__ import annotations

import pytest
import torch

try:
    from dijiang.ops import triton_dijiang as tdj
except Exception:  # pragma: no cover - import problems show up as a skip reason
    tdj = None

from dijiang.ops.testing import check_fused as _check
from dijiang.ops.testing import make_inputs, reference_attention, rel_err

gpu = pytest.mark.skipif(not torch.cuda.is_available() or tdj is None or not tdj.HAS_TRITON,
                         reason="needs CUDA and triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d,m,normalize", [(64, 64, False), (64, 64, True),
                                           (128, 128, False), (128, 128, True), (64, 128, False), (64, 128, True)])
def test_fused_matches_reference(d, m, normalize):
    _check(2, 200, 3, d, m, d, normalize=normalize, init=False, final=False)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [False, True])
def test_fused_state_in_out(normalize):
    _check(1, 333, 2, 64, 64, 64, normalize=normalize, init=True, final=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000, 4097])
def test_fused_lengths(T):
    _check(1, T, 2, 64, 64, 64, normalize=False, init=True, final=True)


@gpu
@pytest.mark.gpu
def test_fused_segments_forced():
    """Segments of several chunks (the long-sequence path) at a size the reference can afford."""
    old = tdj.SEGMENT_CHUNKS_OVERRIDE
    try:
        for seg in (1, 3, 16):
            tdj.SEGMENT_CHUNKS_OVERRIDE = seg
            _check(1, 2500, 2, 64, 64, 64, normalize=True, init=True, final=True)
            _check(1, 2500, 2, 64, 64, 64, normalize=False, init=True, final=True)
    finally:
        tdj.SEGMENT_CHUNKS_OVERRIDE = old


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,normalize", [(1, 1000, 2, False), (1, 4097, 2, True), (2, 4096, 16, False)])
def test_fused_in_kernel_carry(B, T, H, normalize):
    """No state in or out, short enough that F3/B3 carry the segment states themselves (no scan launches)."""
    meta = torch.empty(B, T, H, 64, device="meta")
    cfg = tdj._Cfg(meta, meta, torch.empty(64, 64, device="meta"), 0.125, 1e-6, normalize, 64, plain=True)
    assert cfg.inline and cfg.NSEG > 1
    _check(B, T, H, 64, 64, 64, normalize=normalize, init=False, final=False)


@gpu
@pytest.mark.gpu
def test_fused_float32_tight():
    # float32 inputs: the kernels' dots run in tf32 (~5e-4 per operand); the decay gradient (ill-conditioned
    # scalar, see _check) gets a looser bound than the tensors
    errs = _check(1, 300, 2, 64, 64, 64, normalize=True, init=True, final=True, dtype=torch.float32, tol=2e-2)
    assert all(v < 5e-3 for k, v in errs.items() if not k.startswith("dlog_decay")), errs


@gpu
@pytest.mark.gpu
def test_state_chaining_equals_one_call():
    dev = "cuda"
    q, k, v, proj, lw, ld, _ = make_inputs(1, 500, 2, 64, 64, 64, torch.bfloat16, dev)
    o_full, s_full = tdj.fused_dijiang_attention(q, k, v, proj, lw, ld, output_final_state=True)
    o1, s1 = tdj.fused_dijiang_attention(q[:, :200], k[:, :200], v[:, :200], proj, lw, ld, output_final_state=True)
    o2, s2 = tdj.fused_dijiang_attention(q[:, 200:], k[:, 200:], v[:, 200:], proj, lw, ld, initial_state=s1,
                                         output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o_full) < 1e-2
    assert rel_err(s2, s_full) < 5e-3


@gpu
@pytest.mark.gpu
def test_matches_torch_path():
    pytest.importorskip("dijiang.ops.chunk")
    q, k, v, proj, lw, ld, st = make_inputs(2, 300, 2, 64, 64, 64, torch.bfloat16, "cuda", normalize=True, init=True)
    a, sa = tdj.fused_dijiang_attention(q, k, v, proj, lw, ld, normalize=True, initial_state=st,
                                        output_final_state=True, backend="triton")
    b, sb = tdj.fused_dijiang_attention(q, k, v, proj, lw, ld, normalize=True, initial_state=st,
                                        output_final_state=True, backend="torch")
    assert rel_err(a, b) < 2e-2 and rel_err(sa, sb) < 2e-2


def _misaligned(x):
    """A contiguous copy of x whose data pointer is not 16-byte aligned."""
    flat = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)[1:]
    return flat.view(x.shape).copy_(x)


@gpu
@pytest.mark.gpu
def test_direct_launch_equals_triton_dispatch(monkeypatch):
    """Repeat calls go straight to the compiled kernels (tdj.launch); the results must be bit-identical to
    Triton's own dispatch, also when a call changes what Triton specialises on (T % 16, pointer alignment)."""

    def run(q, k, v, proj, lw, ld, normalize):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, lw, ld)]
        o, fs = tdj.fused_dijiang_attention(*leaves[:3], proj, leaves[3], leaves[4], normalize=normalize,
                                            output_final_state=True, backend="triton")
        grads = torch.autograd.grad((o.float() ** 2).sum() + fs.sum(), leaves)
        return [o, fs, *grads]

    for T, misalign, normalize in [(4096, False, False), (4097, False, True), (4096, True, False), (1, False, True)]:
        q, k, v, proj, lw, ld, _ = make_inputs(1, T, 2, 64, 64, 64, torch.bfloat16, "cuda", seed=T)
        if misalign:
            q, k, v = _misaligned(q), _misaligned(k), _misaligned(v)
            assert q.data_ptr() % 16 != 0
        monkeypatch.setenv("DIJIANG_TRITON_DIRECT_LAUNCH", "0")
        want = run(q, k, v, proj, lw, ld, normalize)
        monkeypatch.setenv("DIJIANG_TRITON_DIRECT_LAUNCH", "1")
        before = len(tdj._COMPILED)
        run(q, k, v, proj, lw, ld, normalize)  # compiles or finds the specialisation, records it
        got = run(q, k, v, proj, lw, ld, normalize)  # direct launches
        assert len(tdj._COMPILED) >= before
        for name, a, b in zip(["o", "final", "dq", "dk", "dv", "dlw", "dld"], got, want):
            assert torch.equal(a, b), (T, misalign, name, rel_err(a, b))
    assert len(tdj._COMPILED) > 0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [False, True])
def test_fused_op_replays_from_cuda_graphs(normalize):
    """The op can be captured (torch.cuda.make_graphed_callables): replays give eager's outputs and gradients."""
    q, k, v, proj, lw, ld, _ = make_inputs(1, 1000, 2, 64, 64, 64, torch.bfloat16, "cuda", seed=3)

    def op(q, k, v, lw, ld):
        return tdj.fused_dijiang_attention(q, k, v, proj, lw, ld, normalize=normalize, backend="triton")[0]

    def leaves():
        return tuple(x.detach().clone().requires_grad_(True) for x in (q, k, v, lw, ld))

    graphed = torch.cuda.make_graphed_callables(op, leaves())
    do = torch.randn_like(v)
    for _ in range(2):  # a second replay must not see anything left over from the first
        xs, ref_xs = leaves(), leaves()
        out = graphed(*xs)
        grads = torch.autograd.grad(out, xs, do)
        ref = op(*ref_xs)
        ref_grads = torch.autograd.grad(ref, ref_xs, do)
        assert torch.equal(out, ref)
        for name, a, b in zip(["dq", "dk", "dv", "dlw", "dld"], grads, ref_grads):
            assert torch.equal(a, b), (name, rel_err(a, b))


@gpu
@pytest.mark.gpu
def test_unsupported_shapes():
    q, k, v, proj, lw, ld, _ = make_inputs(1, 10, 2, 48, 48, 48, torch.bfloat16, "cuda")
    with pytest.raises(ValueError):
        tdj.fused_dijiang_attention(q, k, v, proj, lw, ld, backend="triton")
    o, _ = tdj.fused_dijiang_attention(q, k, v, proj, lw, ld)  # auto: falls back to torch
    assert o.shape == v.shape


def test_bad_inputs_raise_on_cpu():
    """Shape validation runs everywhere (no GPU needed)."""
    if tdj is None:
        pytest.skip("dijiang.ops.triton_dijiang does not import")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError):
        tdj.fused_dijiang_attention(q, q[..., :8], q, torch.randn(16, 16), None, torch.zeros(2))
    with pytest.raises(ValueError):
        tdj.fused_dijiang_attention(q, q, q, torch.randn(8, 16), None, torch.zeros(2))
    with pytest.raises(ValueError):
        tdj.fused_dijiang_attention(q, q, q, torch.randn(16, 16), None, torch.zeros(3))
    with pytest.raises(ValueError):
        tdj.fused_dijiang_attention(q, q, q, torch.randn(16, 16), None, torch.zeros(2), backend="nope")


def test_cpu_fallback_matches_reference():
    """On CPU the op dispatches to the torch path; it must equal the reference (float64 math)."""
    if tdj is None:
        pytest.skip("dijiang.ops.triton_dijiang does not import")
    pytest.importorskip("dijiang.ops.chunk")
    q, k, v, proj, lw, ld, st = make_inputs(1, 50, 2, 16, 32, 16, torch.float64, "cpu", normalize=True, init=True,
                                            seed=1)
    st = st.double()
    o, s = tdj.fused_dijiang_attention(q, k, v, proj.double(), lw.double(), ld.double(), normalize=True,
                                       initial_state=st, output_final_state=True, chunk_size=16)
    ro, rs = reference_attention(q, k, v, proj.double(), lw.double(), ld.double(), st, normalize=True)
    assert rel_err(o, ro) < 1e-5 and rel_err(s, rs) < 1e-5


def test_launch_keys_tell_triton_specialisations_apart():
    """launch()'s cache key must change whenever Triton would compile another specialisation."""
    if tdj is None:
        pytest.skip("dijiang.ops.triton_dijiang does not import")
    assert tdj.int_spec(4096) != tdj.int_spec(4097)  # divisibility by 16
    assert tdj.int_spec(1) != tdj.int_spec(17)  # == 1
    assert tdj.int_spec(2**31) != tdj.int_spec(16)  # 64-bit ints
    assert tdj.int_spec(32) == tdj.int_spec(4096)
    x = torch.zeros(9, dtype=torch.bfloat16)
    assert tdj._arg_key(x) != tdj._arg_key(x[1:])  # 16-byte alignment
    assert tdj._arg_key(x) != tdj._arg_key(x.float())  # dtype
    assert tdj._arg_key(True) != tdj._arg_key(1)
    # the whole call's key: alignment and dtype of any outside tensor
    q = torch.zeros(1, 20, 2, 16, dtype=torch.bfloat16)
    shifted = torch.zeros(q.numel() + 1, dtype=torch.bfloat16)[1:].view(q.shape)
    proj, lw, ld = torch.zeros(16, 16), torch.zeros(2, 16), torch.zeros(2)
    cfg = tdj._Cfg(q, q, proj, 0.25, 1e-6, False, 16)
    spec = tdj._call_spec(cfg, q.dtype, q, q, q, proj, lw, ld)
    assert spec == tdj._call_spec(cfg, q.dtype, q.clone(), q, q, proj, lw, ld)
    assert spec != tdj._call_spec(cfg, q.dtype, q, shifted, q, proj, lw, ld)
    assert spec != tdj._call_spec(cfg, q.dtype, q, q, q, proj, lw, torch.zeros(3)[1:])
    assert spec != tdj._call_spec(cfg, q.dtype, q, q, q.half(), proj, lw, ld)
    assert spec != tdj._call_spec(cfg, torch.float32, q, q, q, proj, lw, ld)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T,normalize,init,final,segment", [(1000, True, False, False, None),
                                                             (2500, False, True, True, 3),
                                                             (4097, True, False, True, None)])
def test_fused_per_token_decay(T, normalize, init, final, segment):
    """A per-token decay [B, T, H] (the layer's decay_gate) against linear_attention in float64: output, state and
    every gradient, the per-token decay's included."""
    import torch.nn.functional as F

    from dijiang.ops import linear_attention

    q, k, v, proj, lw, ld, st = make_inputs(2, T, 2, 64, 64, 64, torch.bfloat16, "cuda", normalize=normalize,
                                            init=init, seed=T)
    gate = 0.5 * torch.randn(2, T, 2, generator=torch.Generator().manual_seed(T)).cuda()
    token_decay = F.logsigmoid(torch.logit(ld.exp()) + gate)  # around the per-head decays, per token
    leaves = [x.detach().clone().requires_grad_(True) for x in [q, k, v, lw, token_decay] + ([st] if init else [])]
    old = tdj.SEGMENT_CHUNKS_OVERRIDE
    tdj.SEGMENT_CHUNKS_OVERRIDE = segment
    try:
        o, fs = tdj.fused_dijiang_attention(*leaves[:3], proj, leaves[3], leaves[4], normalize=normalize,
                                            initial_state=leaves[5] if init else None, output_final_state=final,
                                            backend="triton")
    finally:
        tdj.SEGMENT_CHUNKS_OVERRIDE = old
    ref = [x.detach().double().requires_grad_(True) for x in leaves]
    scale = 64**-0.25
    qf, kf = (torch.softmax(x * scale @ proj.double() + ref[3], -1) for x in ref[:2])
    ro, rfs = linear_attention(qf, kf, ref[2], ref[4], mode="chunk", normalize=normalize,
                               initial_state=ref[5] if init else None, output_final_state=final)
    do = torch.randn_like(ro)
    loss, loss_ref = (o.double() * do).sum(), (ro * do).sum()
    if final:
        dS = torch.randn_like(rfs)
        loss, loss_ref = loss + (fs.double() * dS).sum(), loss_ref + (rfs * dS).sum()
    grads = torch.autograd.grad(loss, leaves)
    grads_ref = torch.autograd.grad(loss_ref, ref)
    assert rel_err(o, ro) < 2e-2
    if final:
        assert rel_err(fs, rfs) < 2e-2
    for name, g, g0 in zip(["q", "k", "v", "log_weight", "token_decay", "init"], grads, grads_ref):
        assert rel_err(g, g0) < 5e-2, name
