"""Runs the Triton kernels under the Triton interpreter (CPU, numpy) against the PyTorch ops; prints JSON.

Needs TRITON_INTERPRET=1 in the environment before triton is imported, so tests/test_triton_interpret.py
runs it in a subprocess. Each result is a relative error (float32 throughout).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from dijiang.ops import linear_attention, window_attention  # noqa: E402
from dijiang.ops import triton_dijiang  # noqa: E402
from dijiang.ops.testing import rel_err as rel  # noqa: E402
from dijiang.ops.triton_dijiang import dijiang_feature_map, fused_dijiang_attention  # noqa: E402
from dijiang.ops.triton_dijiang import torch_dijiang_attention as _torch_dijiang_attention  # noqa: E402
from dijiang.ops.triton_window import fused_window_attention  # noqa: E402
from dijiang.ops.triton_window_decode import advance_masks, window_decode_step  # noqa: E402


def leaf(*shape, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen) * scale).requires_grad_()


def grads_of(fn, leaves, seed):
    """Output, final state and the gradients of sum(o * do) for a fixed random do."""
    o, state = fn()
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((o * do).sum(), leaves, allow_unused=True)
    return o.detach(), state, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def window_case(B, T, H, d, W, seed=0, transform=False, sinks=0, loud_sinks=False, token_decay=False) -> dict:
    """transform: the linear part sees q, k through a per-head d x d map (the layer's feature_transform);
    sinks: the first tokens stay softmax keys; loud_sinks: their keys 3x as long, so that they hold the max;
    token_decay: a per-token decay logsigmoid(decay + u . v_t) (the layer's decay_gate), u a leaf too."""
    gen = torch.Generator().manual_seed(seed)
    q, k = leaf(B, T, H, d, scale=2.0, gen=gen), leaf(B, T, H, d, scale=2.0, gen=gen)
    v = leaf(B, T, H, d, gen=gen)
    proj = torch.randn(d, d, generator=gen)
    log_weight = leaf(H, d, scale=0.3, gen=gen)
    decay_raw, mix_raw = leaf(H, gen=gen), leaf(H, gen=gen)
    leaves = [q, k, v, log_weight, decay_raw, mix_raw]
    transform_map = leaf(H, d, d, scale=d**-0.5, gen=gen) if transform else None
    if transform:
        leaves.append(transform_map)
    gate = leaf(H, d, scale=0.3, gen=gen) if token_decay else None
    fs = 0.2
    boost = torch.ones(1, T, 1, 1)
    if loud_sinks:
        boost[:, :sinks] = 3.0
    k_leaf = k

    def linear_inputs():
        k = k_leaf * boost
        if not transform:
            return q, k
        return (torch.einsum("bthd,hde->bthe", x, transform_map) for x in (q, k))

    def log_decay():
        if gate is None:
            return F.logsigmoid(decay_raw)
        return F.logsigmoid(decay_raw + torch.einsum("bthd,hd->bth", v, gate))

    def fused():
        q_lin, k_lin = linear_inputs()
        return fused_window_attention(q, k_leaf * boost, v, proj, log_weight, log_decay(), F.softplus(mix_raw),
                                      window=W, scale=d**-0.5, feature_scale=fs, output_final_state=True,
                                      q_lin=q_lin if transform else None, k_lin=k_lin if transform else None,
                                      sinks=sinks)

    def reference():
        qf, kf = (dijiang_feature_map(x, proj, log_weight, fs) for x in linear_inputs())
        return window_attention(q, k_leaf * boost, v, qf, kf, log_decay(), F.softplus(mix_raw), window=W,
                                scale=d**-0.5, mode="parallel", output_final_state=True, sinks=sinks)

    names = ["q", "k", "v", "log_weight", "decay", "mix"] + (["transform"] if transform else [])
    if gate is not None:
        leaves.append(gate)
        names.append("gate")
    o1, s1, g1 = grads_of(fused, leaves, seed + 1)
    o2, s2, g2 = grads_of(reference, leaves, seed + 1)
    out = {"o": rel(o1, o2)}
    out.update({f"d_{n}": rel(a, b) for n, a, b in zip(names, g1, g2)})
    keys = ("S", "k", "v", "kf") + (("sink_k", "sink_v") if sinks else ())
    out.update({f"state_{key}": rel(s1[key].float(), s2[key].float()) for key in keys})
    masks = ("mask", "sink_mask") if sinks else ("mask",)
    out["state_mask_equal"] = 0.0 if all(bool((s1[key] == s2[key]).all()) for key in masks) else 1.0
    return out


def dijiang_case(B, T, H, d, normalize, with_state, seed=0, frozen_map=False, final=True, token_decay=False,
                 segment=None) -> dict:
    """frozen_map: log_weight and the decay need no gradient (the kernel then skips their reductions).
    with_state=False, final=False: no state in or out, so F3/B3 carry the segment states themselves (inline).
    token_decay: a per-token decay [B, T, H], logsigmoid(decay + a per-token leaf) (the layer's decay_gate).
    segment: chunks per segment (the scan path with several chunks a segment, as long sequences take)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (leaf(B, T, H, d, gen=gen) for _ in range(3))
    proj = torch.randn(d, d, generator=gen)
    log_weight, decay_raw = leaf(H, d, scale=0.3, gen=gen), leaf(H, gen=gen)
    init = (torch.rand(B, H, d, d + int(normalize), generator=gen) if with_state else None)
    if init is not None:
        init.requires_grad_()
    if frozen_map:
        log_weight.requires_grad_(False)
        decay_raw.requires_grad_(False)
    gate = leaf(B, T, H, gen=gen) if token_decay else None
    leaves = [q, k, v] + ([] if frozen_map else [log_weight, decay_raw]) + ([init] if with_state else [])
    leaves += [] if gate is None else [gate]
    common = dict(normalize=normalize, initial_state=init, output_final_state=final, chunk_size=16)

    def log_decay(raw):
        return F.logsigmoid(raw if gate is None else raw + gate.to(raw.dtype))

    def fused():
        return fused_dijiang_attention(q, k, v, proj, log_weight, log_decay(decay_raw), backend="triton", **common)

    def reference():  # float64: the decay gradient cancels ~10x, so a float32 reference is no yardstick for it
        qf, kf = (torch.softmax(x.double() * d**-0.25 @ proj.double() + log_weight.double(), -1) for x in (q, k))
        state = dict(common, initial_state=None if init is None else init.double())
        o, final = linear_attention(qf, kf, v.double(), log_decay(decay_raw.double()), mode="parallel", **state)
        return o.float(), None if final is None else final.float()

    scans = []
    real_scan = triton_dijiang._scan
    triton_dijiang._scan = lambda *args: scans.append(args) or real_scan(*args)
    triton_dijiang.SEGMENT_CHUNKS_OVERRIDE = segment
    try:
        o1, s1, g1 = grads_of(fused, leaves, seed + 1)
    finally:
        triton_dijiang._scan = real_scan
        triton_dijiang.SEGMENT_CHUNKS_OVERRIDE = None
    o2, s2, g2 = grads_of(reference, leaves, seed + 1)
    out = {"o": rel(o1, o2)}
    if final:
        out["state"] = rel(s1, s2)
    # the scan kernels (forward, backward) run only where a state goes in or out
    out["scan_launches_unexpected"] = float(len(scans) != (2 if with_state or final else 0))
    names = ["q", "k", "v"] + ([] if frozen_map else ["log_weight", "decay"]) + (["init"] if with_state else [])
    names += [] if gate is None else ["gate"]
    out.update({f"d_{n}": rel(a, b) for n, a, b in zip(names, g1, g2)})
    return out


def layer_case(B, T, feature_map="hedgehog", seed=0, with_state=False, gate=False, window=0, sinks=0,
               transform=False, delta=False) -> dict:
    """A converted layer through the fused kernels (``DiJiangAttention._fused``: Hedgehog's map as its log-features
    with an identity projection, DiJiang's as its projection) against the layer's torch path: output, final state
    and the gradients of q, k, v and every new parameter of the layer (maps, decay, gate, linear weight,
    transform); with_state: a state carried in (pure layers only: the fused window op starts empty); delta: a
    window layer with a delta branch (the band kernel without its linear part, the delta rule's torch form)."""
    import dijiang
    from dijiang.conversion import iter_dijiang_layers
    from helpers import tiny_model

    torch.manual_seed(seed)
    settings = dict(feature_map=feature_map, decay_gate=gate, window=window, sinks=sinks, feature_transform=transform,
                    state_update="delta" if delta else "add")
    model = dijiang.convert(tiny_model("llama", seed=seed), settings)
    layer = next(layer for _, layer in iter_dijiang_layers(model))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the init (identity maps, u = 0), so that each parameter matters
        for name, p in layer.named_parameters():
            if name.startswith(("feature_map.", "key_feature_map.", "decay_gate", "window_mix", "feature_transform",
                                "delta_beta")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    new = {id(p) for p in layer.new_parameters()}
    named = [(name, p) for name, p in layer.named_parameters() if id(p) in new and p.requires_grad]
    H, d, m = layer.num_heads, layer.head_dim, layer.feature_map.num_features
    q, k, v = (leaf(B, T, H, d, gen=gen) for _ in range(3))
    init = torch.rand(B, H, m, d + 1, generator=gen).requires_grad_() if with_state else None
    leaves = [q, k, v] + [p for _, p in named] + ([init] if with_state else [])

    def fused():
        return layer._fused(q, k, v, init, True)

    def reference():
        return layer._attend(q, k, v, mode="chunk", mask=None, initial_state=init, output_final_state=True)

    triton_dijiang.torch_dijiang_attention = None  # the kernel must run (m = 32 here), not the torch fallback
    try:
        o1, s1, g1 = grads_of(fused, leaves, seed + 1)
    finally:
        triton_dijiang.torch_dijiang_attention = _torch_dijiang_attention
    o2, s2, g2 = grads_of(reference, leaves, seed + 1)
    names = ["q", "k", "v"] + [name for name, _ in named] + (["init"] if with_state else [])
    out = {"o": rel(o1, o2), **{f"d_{n}": rel(a, b) for n, a, b in zip(names, g1, g2)}}
    if window:  # the decode state: the linear S, the window's raw and feature-mapped keys and values, the sinks
        out.update({f"state_{key}": rel(s1[key].float(), s2[key].float()) for key in s2
                    if not key.endswith("mask") and s2[key].abs().sum() > 0})
        out["state_mask_equal"] = float(not all(torch.equal(s1[key], s2[key]) for key in s2 if key.endswith("mask")))
        out["state_shape_mismatch"] = float(s1.keys() != s2.keys() or any(s1[key].shape != s2[key].shape for key in s2))
    else:
        out["state"] = rel(s1, s2)
    return out


def reduce_case(B, H, NC, M, seed=0) -> dict:
    """The backward's last kernel: B3's per-chunk partials summed over batch and chunks, against torch sums
    (NC larger than the kernel's row block, so its loop runs several times)."""
    gen = torch.Generator().manual_seed(seed)
    n_w = B * H * NC * M
    part = torch.randn(n_w + B * H * NC, generator=gen)
    sums = torch.empty(H * M + H)
    triton_dijiang.launch(triton_dijiang._reduce_partials, (H,), (part, sums, B, H, NC), dict(M=M, BLK=32),
                          num_warps=4)
    return {"d_log_weight": rel(sums[: H * M].view(H, M), part[:n_w].view(B, H, NC, M).sum(dim=(0, 2))),
            "d_decay": rel(sums[H * M :], part[n_w:].view(B, H, NC).sum(dim=(0, 2)))}


def window_decode_case(B, H, d, m, W, ring, seed=0, sinks=0, held=0) -> dict:
    """One decode step of the kernel over a ring buffer (oldest token at slot ring % W) against the recurrent
    PyTorch op over the same window stored oldest-first: the output and every piece of the new state.
    sinks: S attention sinks, of which the last row holds `held` (its oldest token is real: it joins them if
    held < S); row 0's oldest slot is padding, and it holds none (padding never becomes a sink)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q, k, v = rnd(B, H, d), rnd(B, H, d), rnd(B, H, d)
    qf, kf = torch.softmax(rnd(B, H, m), -1), torch.softmax(rnd(B, H, m), -1)
    ordered = {"k": rnd(B, W, H, d), "v": rnd(B, W, H, d), "kf": torch.softmax(rnd(B, W, H, m), -1),
               "mask": torch.rand(B, W, generator=gen) > 0.3, "S": rnd(B, H, m, d + 1).abs()}
    ordered["mask"][0, : W // 2] = False  # a row whose window starts with padding
    sink_state = {}
    if sinks:
        ordered["mask"][-1, 0] = True
        sink_mask = torch.zeros(B, sinks, dtype=torch.bool)
        sink_mask[-1, :held] = True
        # loud keys: the sinks hold the max of some heads
        sink_state = {"sink_k": 3 * rnd(B, sinks, H, d) * sink_mask[:, :, None, None],
                      "sink_v": rnd(B, sinks, H, d) * sink_mask[:, :, None, None], "sink_mask": sink_mask}
    log_decay, lin_weight = -torch.rand(H, generator=gen) * 0.1, torch.rand(H, generator=gen) + 0.5
    slot = ring % W
    ring_state = {key: (x.roll(slot, dims=1) if key != "S" else x).clone() for key, x in ordered.items()}
    ring_state.update({key: x.clone() for key, x in sink_state.items()})
    ring = torch.tensor([ring])
    o = window_decode_step(q, k, v, qf, kf, ring_state, ring, torch.exp(log_decay), lin_weight, scale=d**-0.5)
    advance_masks(ring_state["mask"], ring, ring_state.get("sink_mask"))
    o_ref, new = window_attention(q[:, None], k[:, None], v[:, None], qf[:, None], kf[:, None], log_decay,
                                  lin_weight, window=W, scale=d**-0.5, mode="recurrent",
                                  initial_state={**ordered, **sink_state}, output_final_state=True, sinks=sinks)
    back = {key: (x.roll(-(slot + 1), dims=1) if key in ("k", "v", "kf", "mask") else x)
            for key, x in ring_state.items()}
    out = {"o": rel(o, o_ref[:, 0])}
    out["state_S"] = rel(back["S"], new["S"])
    real = new["mask"][:, :, None, None].float()  # the op zeroes padding slots; the kernel leaves them (never read)
    out.update({f"state_{key}": rel(back[key].float() * real, new[key].float() * real) for key in ("k", "v", "kf")})
    out["state_mask_equal"] = float(not torch.equal(back["mask"], new["mask"]))
    if sinks:
        held_now = new["sink_mask"][:, :, None, None].float()
        out.update({f"state_{key}": rel(back[key].float() * held_now, new[key].float() * held_now)
                    for key in ("sink_k", "sink_v")})
        out["state_mask_equal"] += float(not torch.equal(back["sink_mask"], new["sink_mask"]))
        # the case tests what it says: the last row's oldest token joined if there was room, row 0's padding not
        joined = new["sink_mask"].sum(dim=1)
        out["sink_count_wrong"] = float(joined[-1] != min(held + 1, sinks)) + float(joined[0] != 0)
    return out


def fast_decode_window_kernel_case(sinks=0) -> dict:
    """The fast decoder with its window layers on the decode kernel (ring buffer, one shared padding mask) gives
    model.generate's greedy tokens: batch 2, left padding, many steps past a window of 4 (and `sinks` sinks:
    the short prompt's row fills them while decoding)."""
    import dijiang
    from dijiang import fast_decode
    from helpers import left_padded, reference, tiny_model

    os.environ["DIJIANG_WINDOW_DECODE_KERNEL"] = "force"
    model = dijiang.convert(tiny_model("llama", seed=1), dict(window=4, sinks=sinks))
    ids, mask = left_padded()
    expected = reference(model, ids, mask, 12)
    got = fast_decode.fast_generate(model, ids, mask, max_new_tokens=12)
    decoder = next(iter(model._dijiang_fast_decoders.values()))
    on_kernel = sum(isinstance(p.fn, fast_decode._KernelWindowStep) for p in decoder.plans)
    return {"tokens_differ": float(not torch.equal(got, expected)), "layers_not_on_kernel": float(3 - on_kernel)}


CASES = {
    "window B1 T200 W48 (linear part, partial last block)": lambda: window_case(1, 200, 2, 16, 48),
    "window B2 T300 W64": lambda: window_case(2, 300, 2, 16, 64, seed=1),
    "window B1 T100 W128 (window longer than the sequence)": lambda: window_case(1, 100, 2, 16, 128, seed=2),
    "window B1 T64 W1 (one-key band: the max gradient dominates)": lambda: window_case(1, 64, 2, 16, 1, seed=3),
    "window B1 T130 W100 (band across three key blocks)": lambda: window_case(1, 130, 2, 16, 100, seed=4),
    "window B1 T200 W48 (linear part through a learned transform)": lambda: window_case(1, 200, 2, 16, 48, seed=5,
                                                                                       transform=True),
    "window B2 T300 W64 with 4 sinks": lambda: window_case(2, 300, 2, 16, 64, seed=6, sinks=4),
    "window B1 T200 W48 with 20 loud sinks (they hold the max), transform":
        lambda: window_case(1, 200, 2, 16, 48, seed=7, transform=True, sinks=20, loud_sinks=True),
    "window B1 T40 W48 with 4 sinks (none leaves the window)": lambda: window_case(1, 40, 2, 16, 48, seed=8, sinks=4),
    "window B2 T300 W48 with a per-token decay, 4 sinks, transform":
        lambda: window_case(2, 300, 2, 16, 48, seed=9, transform=True, sinks=4, token_decay=True),
    "dijiang T150 normalize": lambda: dijiang_case(1, 150, 2, 16, True, False),
    "dijiang T70 state in/out": lambda: dijiang_case(2, 70, 2, 16, False, True, seed=5),
    "dijiang T90 normalize, frozen feature weights and decay": lambda: dijiang_case(1, 90, 2, 16, True, True, seed=6,
                                                                                   frozen_map=True),
    "dijiang T150 normalize, no state (in-kernel carry, 3 segments)": lambda: dijiang_case(1, 150, 2, 16, True, False,
                                                                                            seed=7, final=False),
    "dijiang B2 T300 no state (in-kernel carry, 4 segments)": lambda: dijiang_case(2, 300, 2, 16, False, False,
                                                                                    seed=8, final=False),
    "dijiang B2 T150 per-token decay, state in and out (scan)": lambda: dijiang_case(2, 150, 2, 16, False, True, seed=9,
                                                                                      token_decay=True),
    "dijiang T150 normalize, per-token decay, no state (in-kernel carry)":
        lambda: dijiang_case(1, 150, 2, 16, True, False, seed=10, final=False, token_decay=True),
    "dijiang T200 normalize, per-token decay, final state out": lambda: dijiang_case(1, 200, 2, 16, True, False,
                                                                                      seed=11, token_decay=True),
    "dijiang B2 T207 per-token decay, state in and out, segments of 3 chunks":
        lambda: dijiang_case(2, 207, 2, 16, False, True, seed=12, token_decay=True, segment=3),
    "layer, hedgehog: T150 (pure, fused kernel on its log-features)": lambda: layer_case(1, 150),
    "layer, hedgehog: B2 T100 state in, data-dependent decay": lambda: layer_case(2, 100, seed=1, with_state=True,
                                                                                gate=True),
    "layer, hedgehog: B2 T150 window 40 + 4 sinks (the fused window op)": lambda: layer_case(2, 150, seed=2, window=40,
                                                                                           sinks=4),
    "layer, hedgehog: T120 window 48, data-dependent decay": lambda: layer_case(1, 120, seed=3, window=48, gate=True),
    "layer, dijiang: B2 T100 state in, transform": lambda: layer_case(2, 100, "dijiang", seed=4, with_state=True,
                                                                    transform=True),
    "layer, dijiang: T150 window 40 + 4 sinks, transform, data-dependent decay":
        lambda: layer_case(1, 150, "dijiang", seed=5, window=40, sinks=4, transform=True, gate=True),
    "layer, hedgehog: B2 T150 window 40 + 4 sinks with a delta branch, data-dependent decay":
        lambda: layer_case(2, 150, seed=6, window=40, sinks=4, gate=True, delta=True),
    "layer, dijiang: T120 window 48 with a delta branch, transform":
        lambda: layer_case(1, 120, "dijiang", seed=7, window=48, transform=True, delta=True),
    "window decode B2 H3 d16 m32 W8, ring 0": lambda: window_decode_case(2, 3, 16, 32, 8, 0),
    "window decode B2 H2 d16 m16 W5 (window not a power of two), ring 13": lambda: window_decode_case(2, 2, 16, 16, 5,
                                                                                                       13, seed=1),
    "window decode B2 H3 d16 m32 W8 with 4 sinks, 2 held (the leaving token joins), ring 3":
        lambda: window_decode_case(2, 3, 16, 32, 8, 3, seed=2, sinks=4, held=2),
    "window decode B2 H2 d16 m16 W6 with 4 sinks, all held, ring 9":
        lambda: window_decode_case(2, 2, 16, 16, 6, 9, seed=3, sinks=4, held=4),
    "window decode B3 H2 d16 m16 W5 with 3 sinks (not a power of two), none held, ring 0":
        lambda: window_decode_case(3, 2, 16, 16, 5, 0, seed=4, sinks=3, held=0),
    "window decode in the fast decoder (greedy tokens)": fast_decode_window_kernel_case,
    "window decode in the fast decoder with 2 sinks (greedy tokens)": lambda: fast_decode_window_kernel_case(2),
    "reduce B2 H3 NC70 M16 (partial sums of the decay and feature-weight gradients)": lambda: reduce_case(2, 3, 70, 16),
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    print(json.dumps({name: CASES[name]() for name in names}))
