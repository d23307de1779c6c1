"""Fast generation for converted Llama-family models: chunked prefill, then a static, graph-captured decode loop.

``model.generate`` spends most of a decode step in Python (cache objects, mask building, logits processors,
~40 module calls a layer). For a converted model the per-layer decode work is tiny (a fixed-size state update),
so the step is launch-bound. This module:

1. prefills with the model's normal forward (chunk form), which fills a :class:`~dijiang.cache.DiJiangCache`;
2. copies that cache into *static* buffers: the linear-attention state of every converted layer (updated in
   place, ``S.mul_(decay).add_(phi(k)^T v)``), the fixed-size window-hybrid state, and for softmax layers left
   in a hybrid a static KV buffer of the maximum length (prompt + new tokens) with a validity mask;
3. runs one decode step as plain tensor code over static token/position buffers: embeddings -> per layer
   (RMSNorm, fused q/k/v, RoPE for one position from a precomputed table, feature map, state update, readout,
   output path, residual, MLP) -> final norm -> lm_head -> greedy argmax or seeded temperature/top-p sampling;
4. on CUDA captures that step in one ``torch.cuda.CUDAGraph`` (optionally with the per-layer function compiled
   by ``torch.compile`` first, which fuses the elementwise work) and replays it; on CPU runs it eagerly.
   Window-hybrid layers on CUDA run their attention in one Triton kernel over a ring buffer of the last W
   tokens (``dijiang.ops.triton_window_decode``); elsewhere, and with a data-dependent decay, which that kernel
   does not take, they shift the window in plain tensor code. The kernel holds attention sinks too (the shipped
   recipe's layers: a 124-token window and the first 4 tokens).

Supported families: llama, mistral, qwen2, qwen3 (pure, window-hybrid and partly-converted models, and
unconverted ones, which then run with static KV buffers). Anything else falls back to ``model.generate`` with a
warning. Greedy output equals ``model.generate(do_sample=False)`` (same tokens, same eos/padding handling and
same output length); sampling is reproducible by ``seed`` but does not replay HF's random stream.

Memory: the fused q/k/v and gate/up weights are copies (the model's own parameters are untouched), i.e. about
the size of the attention and up/gate projections once more; pass ``fuse_projections=False`` to avoid it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dijiang import settings
from dijiang.attention import DiJiangAttention
from dijiang.feature_maps import EluFeatureMap, HedgehogFeatureMap, ProjectedFeatureMap
from dijiang.hf_compat import family_of, output_cache
from dijiang.ops.triton_window_decode import advance_masks

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_DEFAULT = object()

__all__ = ["fast_generate", "FastDecoder", "supports_fast_decode", "SUPPORTED_FAMILIES"]


# ----------------------------------------------------------------------------------------------- support check

# The decoder's build reads three settings (dijiang.settings):
# - torch.compile mode of the per-layer step (DIJIANG_COMPILE_MODE); the graph capture is ours, so no mode that
#   adds cudagraphs. max-autotune-no-cudagraphs: Inductor autotunes the step's matmuls, which a batch-1 decode
#   step, launch- and memory-bound, gains from; "default" compiles faster.
# - the compile scope (DIJIANG_COMPILE_SCOPE): "layer" compiles one decode-layer step and reuses it for every layer
#   of a kind (short compile); "step" compiles the whole step (all layers, final norm, head), so Inductor can fuse
#   across layer boundaries.
# - window layers on CUDA run their attention in one Triton kernel over a ring buffer
#   (DIJIANG_WINDOW_DECODE_KERNEL): "0" the compiled torch step; "force" the kernel on any device (tests run it on
#   the CPU under the Triton interpreter).


def supports_fast_decode(model, max_len: int | None = None) -> tuple[bool, str]:
    """(True, "") when the fast path can run this model, else (False, why)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        return False, "not a Hugging Face model"
    family = family_of(model.config)
    if family not in SUPPORTED_FAMILIES:
        return False, f"family {family!r} has no fast path (supported: {', '.join(SUPPORTED_FAMILIES)})"
    base = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if base is None or not all(hasattr(base, n) for n in needed) or not hasattr(model, "lm_head"):
        return False, "unexpected module layout (expected model.model.{embed_tokens,layers,norm,rotary_emb}, lm_head)"
    rope_type = getattr(base.rotary_emb, "rope_type", "default")
    if rope_type not in ("default", "linear", "llama3", "yarn", "longrope") or "dynamic" in str(rope_type):
        return False, f"rope type {rope_type!r} depends on the sequence length; no fast path"
    for layer in base.layers:
        attn = layer.self_attn
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return False, "decoder layer without input/post-attention norms and an MLP"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon"):
                return False, f"unexpected norm {type(norm).__name__}"
        if not all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return False, "unexpected MLP layout"
        if isinstance(attn, DiJiangAttention):
            if not isinstance(attn.feature_map, (ProjectedFeatureMap, EluFeatureMap, HedgehogFeatureMap)):
                return False, f"feature map {type(attn.feature_map).__name__} has no fast path"
            if attn.settings.state_update != "add":
                return False, f"state_update={attn.settings.state_update!r} has no fast path (model.generate runs it)"
            if attn.full_kv_heads:
                return False, "a head hybrid's exact heads (full_kv_heads) have no fast path (model.generate runs it)"
        else:
            window = getattr(attn, "sliding_window", None)
            if window and max_len is not None and max_len > window:
                return False, f"softmax layer with a sliding window ({window}) shorter than the sequence ({max_len})"
    return True, ""


# ----------------------------------------------------------------------------------------------- functional pieces

def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's LlamaRMSNorm, op for op (float32 statistics, scaled in the input dtype)."""
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, d], cos/sin [B, 1, d]: HF's q * cos + rotate_half(q) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _project(x: Tensor, w: dict, c: "_Consts"):
    """x [B, D] -> q [B, H, d], k, v [B, Hkv, d] (pre-RoPE), q/k RMS-normed for Qwen3."""
    batch = x.shape[0]
    if c.fused:
        q, k, v = F.linear(x, w["w_qkv"], w.get("b_qkv")).split(c.qkv_sizes, dim=-1)
    else:
        q, k, v = (F.linear(x, w[f"w_{n}"], w.get(f"b_{n}")) for n in "qkv")
    q = q.view(batch, c.num_heads, c.head_dim)
    k = k.view(batch, c.num_kv_heads, c.head_dim)
    v = v.view(batch, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
        q, k = _rms(q, w["q_norm"], c.q_norm_eps), _rms(k, w["k_norm"], c.k_norm_eps)
    return q, k, v


def _mlp(h: Tensor, w: dict, c: "_Consts") -> Tensor:
    x = _rms(h, w["post_norm"], c.post_eps)
    if c.fused:
        gate, up = F.linear(x, w["w_gate_up"], w.get("b_gate_up")).split(c.mlp_sizes, dim=-1)
    else:
        gate, up = F.linear(x, w["w_gate"], w.get("b_gate")), F.linear(x, w["w_up"], w.get("b_up"))
    return h + F.linear(c.act(gate) * up, w["w_down"], w.get("b_down"))


def _features(x: Tensor, w: dict, c: "_Consts", prefix: str) -> Tensor:
    """The layer's feature map on x [B, H, d] -> [B, H, m] (output in x.dtype, computed in float32); prefix: "q" or
    "k", for maps that keep one apart for keys (Hedgehog's)."""
    xf = x.float()
    if c.feature_kind == "elu":
        return (F.elu(xf * c.fm_sqrt_scale) + 1.0).to(x.dtype)
    if c.feature_kind == "hedgehog":
        z = torch.einsum("bhd,hdf->bhf", xf, w[f"hedgehog_{prefix}"])
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1).to(x.dtype)
    xs = xf * c.fm_sqrt_scale
    if c.reduce_matmul:  # a pointwise+reduction that torch.compile fuses with its neighbours
        z = (xs.unsqueeze(-1) * w["projection"]).sum(-2)
    elif w["projection"].dim() == 3:  # per head: the layer's feature_transform folded in
        z = torch.einsum("bhd,hdm->bhm", xs, w["projection"])
    else:
        z = xs @ w["projection"]
    if "fm_log_weight" in w:
        z = z + w["fm_log_weight"]
    if c.stabiliser == "softmax":
        phi = torch.softmax(z, dim=-1)
    else:
        sq_norm = xf.pow(2).sum(-1, keepdim=True) * (c.fm_scale / 2)
        log_phi = z - sq_norm - 0.5 * math.log(c.num_features)
        phi = torch.exp(log_phi.clamp(max=c.fm_cap))
    return phi.to(x.dtype)


def _finish_attention(o: Tensor, x: Tensor, h: Tensor, w: dict, c: "_Consts") -> Tensor:
    """o [B, H, d] in the model dtype -> GroupNorm, gate, o_proj, residual."""
    batch = o.shape[0]
    o = o.reshape(batch, c.num_heads * c.head_dim)
    if c.use_norm:
        o = F.group_norm(o, c.num_heads, w["gn_weight"], w["gn_bias"], c.gn_eps)
    if c.use_gate:
        o = F.silu(F.linear(x, w["w_gate_attn"])) * o
    return h + F.linear(o.to(x.dtype), w["w_o"], w.get("b_o"))


def _gated_log_decay(v: Tensor, w: dict) -> Tensor:
    """The layer's data-dependent log decay (decay_gate) for this step, [B, H] float32, from v [B, H, d] (heads
    expanded), as ``DiJiangAttention.step_log_decay``."""
    return F.logsigmoid(w["decay_logit"] + torch.einsum("bhd,hd->bh", v.float(), w["decay_gate"]))


def _linear_layer_step(h: Tensor, cos: Tensor, sin: Tensor, state: Tensor, w: dict, c: "_Consts") -> Tensor:
    """One decode step of a pure DiJiang decoder layer; updates ``state`` [B, H, m, dv(+1)] in place."""
    x = _rms(h, w["in_norm"], c.in_eps)
    q, k, v = _project(x, w, c)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if c.groups > 1:
        k, v = k.repeat_interleave(c.groups, dim=1), v.repeat_interleave(c.groups, dim=1)
    qf, kf = _features(q, w, c, "q").float(), _features(k, w, c, "k").float()
    vf = v.float()
    if c.normalize:
        vf = torch.cat([vf, vf.new_ones(vf.shape[:-1] + (1,))], dim=-1)
    decay = torch.exp(_gated_log_decay(v, w))[..., None, None] if c.decay_gate else w["decay"]
    state.mul_(decay).add_(kf.unsqueeze(-1) * vf.unsqueeze(-2))
    if c.reduce_matmul:
        o = (qf.unsqueeze(-1) * state).sum(-2)
    else:
        o = torch.einsum("bhm,bhmv->bhv", qf, state)
    if c.normalize:
        o = o[..., :-1] / (o[..., -1:] + c.eps)
    h = _finish_attention(o.to(v.dtype), x, h, w, c)
    return _mlp(h, w, c)


def _window_pre(h: Tensor, cos: Tensor, sin: Tensor, w: dict, c: "_Consts"):
    """The window layer's step up to attention: (x, q, k, v, phi(q), phi(k)), heads expanded."""
    x = _rms(h, w["in_norm"], c.in_eps)
    q, k, v = _project(x, w, c)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    if c.groups > 1:
        k, v = k.repeat_interleave(c.groups, dim=1), v.repeat_interleave(c.groups, dim=1)
    return x, q, k, v, _features(q, w, c, "q"), _features(k, w, c, "k")


def _window_post(o: Tensor, x: Tensor, h: Tensor, w: dict, c: "_Consts") -> Tensor:
    return _mlp(_finish_attention(o, x, h, w, c), w, c)


def _window_layer_step(h: Tensor, cos: Tensor, sin: Tensor, state: dict, w: dict, c: "_Consts") -> Tensor:
    """One decode step of a window-hybrid layer through ``window_attention(mode="recurrent")`` (the window
    shifts by one token); the fixed-size state dict is updated in place (copy_ into the static tensors)."""
    from dijiang.ops import window_attention

    x, q, k, v, qf, kf = _window_pre(h, cos, sin, w, c)
    log_decay = _gated_log_decay(v, w).unsqueeze(1) if c.decay_gate else w["log_decay"]  # per token: [B, 1, H]
    q, k, v, qf, kf = (t.unsqueeze(1) for t in (q, k, v, qf, kf))  # [B, 1, H, .]
    o, new_state = window_attention(
        q, k, v, qf, kf, log_decay, w["lin_weight"], window=c.window, scale=c.attn_scale,
        mode="recurrent", initial_state=state, output_final_state=True, attention_mask=None, sinks=c.sinks,
    )
    for key, value in new_state.items():
        state[key].copy_(value)
    return _window_post(o[:, 0], x, h, w, c)


class _KernelWindowStep:
    """A window layer's decode step with its attention in one Triton kernel (``triton_window_decode``) over a
    ring buffer; the parts before and after it are compiled separately (``compiled``). The window layers share
    one padding mask and one sink mask, which the decoder advances once per step."""

    def __init__(self, pre=_window_pre, post=_window_post):
        self.pre, self.post = pre, post

    def compiled(self, mode) -> "_KernelWindowStep":
        return _KernelWindowStep(torch.compile(_window_pre, dynamic=False, mode=mode),
                                 torch.compile(_window_post, dynamic=False, mode=mode))

    def __call__(self, h: Tensor, cos: Tensor, sin: Tensor, state: dict, w: dict, c: "_Consts") -> Tensor:
        from dijiang.ops.triton_window_decode import window_decode_step

        x, q, k, v, qf, kf = self.pre(h, cos, sin, w, c)
        o = window_decode_step(q, k, v, qf, kf, state, state["ring"], w["decay_flat"], w["lin_weight"],
                               scale=c.attn_scale, eps=c.eps)
        return self.post(o, x, h, w, c)  # the decoder advances the masks once every layer has read them


def _softmax_layer_step(h: Tensor, cos: Tensor, sin: Tensor, kv: dict, w: dict, c: "_Consts") -> Tensor:
    """One decode step of a softmax layer over a static KV buffer [B, Hkv, L, d]; writes slot ``kv['cur']``."""
    x = _rms(h, w["in_norm"], c.in_eps)
    q, k, v = _project(x, w, c)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    cur = kv["cur"]
    kv["k"].index_copy_(2, cur, k.unsqueeze(2))
    kv["v"].index_copy_(2, cur, v.unsqueeze(2))
    mask = kv["mask"][:, None, None, :]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kv["k"], kv["v"], attn_mask=mask, scale=c.attn_scale,
                                       enable_gqa=c.groups > 1)
    h = _finish_attention(o[:, :, 0], x, h, w, c)
    return _mlp(h, w, c)


# ----------------------------------------------------------------------------------------------- per-layer plans

@dataclass(frozen=True)
class _Consts:
    """Python constants of one layer (the same for every layer of a kind, so one compiled function serves all)."""

    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    groups: int
    qkv_sizes: tuple
    mlp_sizes: tuple
    fused: bool
    qk_norm: bool
    q_norm_eps: float
    k_norm_eps: float
    in_eps: float
    post_eps: float
    act: object
    attn_scale: float
    reduce_matmul: bool = False
    feature_kind: str = "projected"
    stabiliser: str = "softmax"
    fm_scale: float = 1.0
    fm_sqrt_scale: float = 1.0
    fm_cap: float = 0.0
    num_features: int = 0
    decay_gate: bool = False
    normalize: bool = False
    eps: float = 1e-6
    use_norm: bool = False
    use_gate: bool = False
    gn_eps: float = 1e-5
    window: int = 0
    sinks: int = 0


@dataclass
class _LayerPlan:
    consts: _Consts
    weights: dict
    state: object = None  # Tensor (linear), dict (window) or dict (softmax KV)
    fn: object = None


def _linear_weights(linear) -> tuple[Tensor, Tensor | None]:
    return linear.weight.detach(), (linear.bias.detach() if linear.bias is not None else None)


def _window_kernel_fits(consts: "_Consts", w: dict) -> bool:
    from dijiang.ops.triton_window_decode import window_decode_supported

    if consts.decay_gate:  # the ring-buffer kernel takes a per-head decay only
        return False
    forced = settings.window_decode_kernel() == "force"
    m = consts.num_features
    device = "cuda" if forced else w["w_o"].device
    return window_decode_supported(consts.head_dim, consts.head_dim, m, consts.window, device)


def _build_plan(layer, fused: bool, reduce_matmul: bool, kernel_window: bool = False) -> _LayerPlan:
    attn, mlp = layer.self_attn, layer.mlp
    converted = isinstance(attn, DiJiangAttention)
    if converted:
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        attn_scale = attn.scale
    else:
        config = attn.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = attn.head_dim
        attn_scale = float(attn.scaling)
    w: dict = {"in_norm": layer.input_layernorm.weight.detach(),
               "post_norm": layer.post_attention_layernorm.weight.detach()}
    projections = [_linear_weights(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
    if fused:
        w["w_qkv"] = torch.cat([p[0] for p in projections], 0)
        if any(p[1] is not None for p in projections):
            w["b_qkv"] = torch.cat([p[1] if p[1] is not None else p[0].new_zeros(p[0].shape[0])
                                    for p in projections], 0)
        gate, up = _linear_weights(mlp.gate_proj), _linear_weights(mlp.up_proj)
        w["w_gate_up"] = torch.cat([gate[0], up[0]], 0)
        if gate[1] is not None or up[1] is not None:
            w["b_gate_up"] = torch.cat([b if b is not None else g.new_zeros(g.shape[0])
                                        for g, b in (gate, up)], 0)
    else:
        for name, (weight, bias) in zip("qkv", projections):
            w[f"w_{name}"] = weight
            if bias is not None:
                w[f"b_{name}"] = bias
        for name in ("gate", "up"):
            weight, bias = _linear_weights(getattr(mlp, f"{name}_proj"))
            w[f"w_{name}"] = weight
            if bias is not None:
                w[f"b_{name}"] = bias
    w["w_down"], b_down = _linear_weights(mlp.down_proj)
    if b_down is not None:
        w["b_down"] = b_down
    w["w_o"], b_o = _linear_weights(attn.o_proj)
    if b_o is not None:
        w["b_o"] = b_o
    qk_norm = hasattr(attn, "q_norm") and getattr(attn, "q_norm", None) is not None
    if qk_norm:
        w["q_norm"], w["k_norm"] = attn.q_norm.weight.detach(), attn.k_norm.weight.detach()
    common = dict(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, groups=heads // kv_heads,
        qkv_sizes=(heads * head_dim, kv_heads * head_dim, kv_heads * head_dim),
        mlp_sizes=(mlp.gate_proj.out_features, mlp.up_proj.out_features), fused=fused, qk_norm=qk_norm,
        q_norm_eps=float(attn.q_norm.variance_epsilon) if qk_norm else 0.0,
        k_norm_eps=float(attn.k_norm.variance_epsilon) if qk_norm else 0.0,
        in_eps=float(layer.input_layernorm.variance_epsilon),
        post_eps=float(layer.post_attention_layernorm.variance_epsilon),
        act=mlp.act_fn, attn_scale=float(attn_scale), reduce_matmul=reduce_matmul,
    )
    if not converted:
        return _LayerPlan(_Consts(kind="softmax", **common), w, fn=_softmax_layer_step)

    settings, fm = attn.settings, attn.feature_map
    extra = dict(use_norm=attn.norm is not None, use_gate=attn.gate is not None, window=settings.window,
                 sinks=settings.sinks, num_features=fm.num_features, fm_scale=fm.scale, fm_sqrt_scale=math.sqrt(fm.scale))
    if isinstance(fm, EluFeatureMap):
        extra["feature_kind"] = "elu"
    elif isinstance(fm, HedgehogFeatureMap):
        extra["feature_kind"] = "hedgehog"
        w["hedgehog_q"], w["hedgehog_k"] = fm.weight.detach().float(), attn.key_map.weight.detach().float()
    else:
        extra["stabiliser"] = fm.stabiliser
        w["projection"] = fm.projection.detach()
        if attn.feature_transform is not None:  # phi(x A_h) = softmax(x (A_h P)): one [H, d, m] projection
            w["projection"] = torch.einsum("hde,em->hdm", attn.feature_transform.detach().float(), w["projection"])
        if fm.log_weight is not None:
            w["fm_log_weight"] = fm.log_weight.detach()
        out_dtype = layer.input_layernorm.weight.dtype
        extra["fm_cap"] = 0.5 * (math.log(torch.finfo(out_dtype).max) - math.log(fm.num_features)) - 1.0
    if attn.norm is not None:
        w["gn_weight"], w["gn_bias"] = attn.norm.weight.detach(), attn.norm.bias.detach()
        extra["gn_eps"] = float(attn.norm.eps)
    if attn.gate is not None:
        w["w_gate_attn"] = attn.gate.weight.detach()
    log_decay = attn.log_decay.detach()
    if attn.decay_gate is not None:
        extra["decay_gate"] = True
        w["decay_logit"], w["decay_gate"] = attn.decay_logit.detach().float(), attn.decay_gate.detach().float()
    if settings.window:
        w["log_decay"] = log_decay
        w["lin_weight"] = F.softplus(attn.window_mix.detach().float())
        consts = _Consts(kind="window", **common, **extra)
        if kernel_window and _window_kernel_fits(consts, w):
            w["decay_flat"] = torch.exp(log_decay.float()).contiguous()
            return _LayerPlan(consts, w, fn=_KernelWindowStep())
        return _LayerPlan(consts, w, fn=_window_layer_step)
    w["decay"] = torch.exp(log_decay)[:, None, None]  # [H, 1, 1] float32
    consts = _Consts(kind="linear", normalize=settings.normalize, **common, **extra)
    return _LayerPlan(consts, w, fn=_linear_layer_step)


# ----------------------------------------------------------------------------------------------- the decoder

def _eos_list(model, eos_token_id) -> list[int]:
    if eos_token_id is _DEFAULT:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(e) for e in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]


@dataclass
class _Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    extra: dict = field(default_factory=dict)


class FastDecoder:
    """Static decode state for one (model, batch size, capacity, sampling mode); reusable across prompts.

    ``generate(input_ids, attention_mask, max_new_tokens)`` runs a prefill and the decode loop. The CUDA graph
    is captured on the first call and replayed afterwards as long as batch size and capacity fit.
    """

    def __init__(self, model, batch_size: int, capacity: int, *, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, use_cuda_graph: bool = True, compile: bool | None = None,
                 fuse_projections: bool = True):
        ok, why = supports_fast_decode(model, capacity)
        if not ok:
            raise ValueError(f"no fast decode path for this model: {why}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        self.model = model
        self.batch_size, self.capacity = int(batch_size), int(capacity)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.is_cuda = self.device.type == "cuda"
        self.use_graph = bool(use_cuda_graph) and self.is_cuda
        if compile is None:
            compile = self.is_cuda
        self.compile = bool(compile)
        self.do_sample, self.temperature, self.top_p = do_sample, float(temperature), float(top_p)
        base = model.model
        self.embed, self.final_norm, self.lm_head = base.embed_tokens, base.norm, model.lm_head
        window_kernel, scope, mode = settings.window_decode_kernel(), settings.compile_scope(), settings.compile_mode()
        kernel_window = window_kernel == "force" or (window_kernel != "0" and self.is_cuda and scope == "layer")
        self.plans = [_build_plan(layer, fuse_projections, reduce_matmul=self.compile, kernel_window=kernel_window)
                      for layer in base.layers]
        kernel_windows = {(p.consts.window, p.consts.sinks) for p in self.plans if isinstance(p.fn, _KernelWindowStep)}
        if len(kernel_windows) > 1:  # the shared masks need one window size and one sink count
            self.plans = [_build_plan(layer, fuse_projections, reduce_matmul=self.compile) for layer in base.layers]
        self.shared_masks = {}  # "mask" [B, W], with sinks "sink_mask" [B, S]: one tensor for the kernel window layers
        self._run_layers = self._layers
        if self.compile and scope == "step":
            self._run_layers = torch.compile(self._layers, dynamic=False, mode=mode)
        elif self.compile:
            compiled = {}
            for plan in self.plans:
                key = "window-kernel" if isinstance(plan.fn, _KernelWindowStep) else plan.consts.kind
                if key not in compiled:
                    compiled[key] = (plan.fn.compiled(mode) if key == "window-kernel"
                                     else torch.compile(plan.fn, dynamic=False, mode=mode))
                plan.fn = compiled[key]
        # rope table for every position the decoder can see
        with torch.no_grad():
            positions = torch.arange(self.capacity + 1, device=self.device)[None]
            dummy = torch.zeros(1, 1, self.head_dim_rope(), device=self.device, dtype=self.dtype)
            cos, sin = base.rotary_emb(dummy, positions)
        self.cos_table, self.sin_table = cos[0].contiguous(), sin[0].contiguous()  # [P, d]
        B = self.batch_size
        self.tok = torch.zeros(B, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(B, dtype=torch.long, device=self.device)
        self.cur = torch.zeros(1, dtype=torch.long, device=self.device)  # KV slot of the token being fed
        self.step_idx = torch.zeros(1, dtype=torch.long, device=self.device)  # column of `out` written next
        self.ring = torch.zeros(1, dtype=torch.long, device=self.device)  # steps since the prefill (window ring)
        self.out = torch.zeros(B, self.capacity + 1, dtype=torch.long, device=self.device)
        self.alive = torch.zeros(self.capacity + 1, dtype=torch.bool, device=self.device)
        self.unfinished = torch.ones(B, dtype=torch.bool, device=self.device)
        self.noise = torch.ones(B, model.lm_head.out_features, dtype=torch.float32, device=self.device)
        self.eos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.pad = torch.zeros((), dtype=torch.long, device=self.device)
        self.slots = torch.arange(self.capacity, device=self.device)
        self.graph = None
        self.generator = torch.Generator(device=self.device)
        self.timings = _Timings()

    def head_dim_rope(self) -> int:
        inv_freq = self.model.model.rotary_emb.inv_freq
        return 2 * inv_freq.shape[-1]

    # ---------------------------------------------------------------- buffers

    def _load_cache(self, cache, attention_mask: Tensor, width: int) -> None:
        """Copy the prefill cache into the static buffers (allocating them on first use)."""
        for i, plan in enumerate(self.plans):
            layer_cache = cache.layers[i]
            if plan.consts.kind == "linear":
                if plan.state is None:
                    plan.state = torch.empty_like(layer_cache.state)
                plan.state.copy_(layer_cache.state)
            elif plan.consts.kind == "window":  # oldest token first, so the ring's slot 0 leaves first
                if plan.state is None:
                    plan.state = {key: torch.empty_like(value) for key, value in layer_cache.state.items()}
                    if isinstance(plan.fn, _KernelWindowStep):  # ring addressing, one padding mask for all
                        plan.state["ring"] = self.ring
                        for key in ("mask", "sink_mask"):  # which slots and sinks are real depends on the padding only
                            if key in plan.state:
                                plan.state[key] = self.shared_masks.setdefault(key, plan.state[key])
                for key, value in layer_cache.state.items():
                    plan.state[key].copy_(value)
            else:
                keys, values = layer_cache.keys, layer_cache.values  # [B, Hkv, width, d]
                if plan.state is None:
                    shape = (self.batch_size, keys.shape[1], self.capacity, keys.shape[3])
                    plan.state = {"k": keys.new_zeros(shape), "v": values.new_zeros(shape), "cur": self.cur,
                                  "real": torch.ones(self.batch_size, self.capacity, dtype=torch.bool,
                                                     device=self.device)}
                plan.state["k"][:, :, :width].copy_(keys)
                plan.state["v"][:, :, :width].copy_(values)
                plan.state["k"][:, :, width:].zero_()
                plan.state["v"][:, :, width:].zero_()
                real = plan.state["real"]  # prompt padding is not real; every generated token is
                real.fill_(True)
                real[:, :width].copy_(attention_mask.bool())

    # ---------------------------------------------------------------- the step

    def _select(self, logits: Tensor) -> Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
            sorted_probs = sorted_probs.masked_fill(before > self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return (probs / self.noise).argmax(-1)  # exponential race: a draw from `probs`

    def _emit(self, nxt: Tensor) -> None:
        """Write the chosen tokens (eos/pad bookkeeping as HF generate does)."""
        if self.eos.numel():
            nxt = torch.where(self.unfinished, nxt, self.pad)
            self.unfinished &= ~torch.isin(nxt, self.eos)
        self.out.index_copy_(1, self.step_idx, nxt[:, None])
        self.alive.index_copy_(0, self.step_idx, self.unfinished.any().reshape(1))
        self.tok.copy_(nxt)
        self.step_idx.add_(1)

    def _layers(self, tok: Tensor, pos: Tensor) -> Tensor:
        h = self.embed(tok)  # [B, D]
        cos = self.cos_table.index_select(0, pos).unsqueeze(1)  # [B, 1, d]
        sin = self.sin_table.index_select(0, pos).unsqueeze(1)
        for plan in self.plans:
            if plan.consts.kind == "softmax":  # a slot is visible once written (slot <= cur) and if real
                plan.state["mask"] = plan.state["real"] & (self.slots <= self.cur)[None, :]
            h = plan.fn(h, cos, sin, plan.state, plan.weights, plan.consts)
        return self.lm_head(self.final_norm(h)).float()

    def _step(self) -> None:
        logits = self._run_layers(self.tok, self.pos)
        if self.shared_masks:  # every layer has read the masks: the leaving token may become a sink, the new
            advance_masks(self.shared_masks["mask"], self.ring, self.shared_masks.get("sink_mask"))  # token's slot real
        self._emit(self._select(logits))
        self.pos.add_(1)
        self.cur.add_(1)
        self.ring.add_(1)

    def _capture(self) -> None:
        """Warm up (compiles) on a side stream, then capture one step. The buffers are restored by the caller."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor, eos: list[int], pad: int) -> None:
        width = input_ids.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1)
        self._load_cache(output_cache(out), attention_mask, width)
        self.eos = torch.tensor(eos, dtype=torch.long, device=self.device)
        self.pad.fill_(pad)
        self.unfinished.fill_(True)
        self.step_idx.zero_()
        self.out.zero_()
        self.alive.zero_()
        self.pos.copy_(attention_mask.long().sum(-1))
        self.cur.fill_(width)
        self.ring.zero_()
        if self.do_sample:
            self.noise.exponential_(generator=self.generator)
        self._emit(self._select(out.logits[:, -1].float()))
        # kept only until the graph is captured (the warm-up steps are undone from it)
        self._prefill_state = (output_cache(out), attention_mask, width) if self.use_graph and self.graph is None \
            else None

    @torch.no_grad()
    def decode(self, steps: int, check_every: int = 32) -> int:
        """Run `steps` decode steps after `prefill`; returns how many ran (early stop when all rows hit eos)."""
        if self.use_graph and self.graph is None and steps > 0:
            buffers = (self.tok, self.pos, self.cur, self.ring, self.step_idx, self.out, self.alive, self.unfinished)
            saved = tuple(buffer.clone() for buffer in buffers)
            self._capture()
            cache, mask, width = self._prefill_state
            self._load_cache(cache, mask, width)  # undo the warm-up steps
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
            self._prefill_state = None
        has_eos = self.eos.numel() > 0
        done = 0
        for i in range(steps):
            if has_eos and (not self.is_cuda or i % check_every == 0) and not bool(self.unfinished.any()):
                break
            if self.do_sample:
                self.noise.exponential_(generator=self.generator)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            done += 1
        return done

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 seed: int = 0, eos_token_id=_DEFAULT, pad_token_id: int | None = None) -> Tensor:
        input_ids = input_ids.to(self.device)
        batch, width = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(f"this decoder was built for batch size {self.batch_size}, got {batch}")
        if width + max_new_tokens > self.capacity:
            raise ValueError(f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds capacity {self.capacity}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        eos = _eos_list(self.model, eos_token_id)
        if pad_token_id is None:
            pad_token_id = getattr(self.model.generation_config, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = eos[0] if eos else 0
        self.generator.manual_seed(int(seed))
        self.prefill(input_ids, attention_mask, eos, int(pad_token_id))
        self.decode(max_new_tokens - 1)
        count = int(self.step_idx.item())
        alive = self.alive[:count].cpu()
        if eos and not bool(alive.all()):
            count = int((~alive).nonzero()[0, 0]) + 1  # HF stops after the step that finished every row
        return torch.cat([input_ids, self.out[:, :count]], dim=1)


# ----------------------------------------------------------------------------------------------- the entry point

def _cache_key(batch, do_sample, temperature, top_p, use_cuda_graph, compile, fuse):
    return (batch, do_sample, temperature, top_p, use_cuda_graph, compile, fuse)


def get_decoder(model, batch_size: int, capacity: int, **options) -> FastDecoder:
    """A FastDecoder for this model, reused across calls when batch size and options match and capacity fits."""
    decoders = model.__dict__.setdefault("_dijiang_fast_decoders", {})
    key = tuple(sorted(options.items())) + (batch_size,)
    decoder = decoders.get(key)
    if decoder is None or decoder.capacity < capacity:
        decoder = FastDecoder(model, batch_size, capacity, **options)
        decoders[key] = decoder
    return decoder


@torch.no_grad()
def fast_generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                  use_cuda_graph: bool = True, *, compile: bool | None = None, eos_token_id=_DEFAULT,
                  pad_token_id: int | None = None, fuse_projections: bool = True) -> Tensor:
    """Like ``model.generate``: returns prompt + new tokens [B, T + new] (LongTensor).

    Greedy by default; ``do_sample`` draws with ``temperature``/``top_p`` from a torch.Generator seeded with
    ``seed``. ``compile`` (default: on CUDA) runs the per-layer step through ``torch.compile``; the step is
    captured in a CUDA graph on CUDA when ``use_cuda_graph``. Left padding via ``attention_mask`` works. Models
    outside the fast path (see :func:`supports_fast_decode`) go through ``model.generate`` with a warning.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    capacity = input_ids.shape[1] + max_new_tokens
    ok, why = supports_fast_decode(model, capacity)
    if not ok:
        warnings.warn(f"fast_generate: {why}; falling back to model.generate", stacklevel=2)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if do_sample:
            torch.manual_seed(seed)
            kwargs.update(temperature=temperature, top_p=top_p)
        if eos_token_id is not _DEFAULT:
            kwargs["eos_token_id"] = eos_token_id
        if pad_token_id is not None:
            kwargs["pad_token_id"] = pad_token_id
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    decoder = get_decoder(model, input_ids.shape[0], capacity, do_sample=do_sample, temperature=float(temperature),
                          top_p=float(top_p), use_cuda_graph=use_cuda_graph, compile=compile,
                          fuse_projections=fuse_projections)
    return decoder.generate(input_ids, attention_mask, max_new_tokens, seed=seed, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id)
