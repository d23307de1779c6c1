"""One small adapter per model family: where the attention modules are and how they make q, k, v.

An adapter answers four questions for the generic ``DiJiangAttention`` layer:
geometry (heads, kv heads, head size, softmax scale), which child modules to keep (the pretrained
projections, under their original names), how hidden states become post-RoPE q, k, v in [B, T, H, d],
and how the attention output goes back through the output projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dijiang.hf_compat import rotary_function


@dataclass(frozen=True)
class Geometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    scale: float


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # HF [B, H, T, d] <-> ours [B, T, H, d]


class SeparateProjections:
    """Llama-style: q_proj/k_proj/v_proj/o_proj linears, RoPE from position_embeddings (Llama, Mistral, Qwen2)."""

    attention_class_suffix = "Attention"
    qkv_names = ("q_proj", "k_proj", "v_proj")
    output_name = "o_proj"
    extra_modules: tuple[str, ...] = ()
    kept_attributes: tuple[str, ...] = ()
    uses_rope = True

    def __init__(self, model_type: str):
        self.model_type = model_type
        self.rope = rotary_function(model_type) if self.uses_rope else None

    def is_attention(self, module: nn.Module) -> bool:
        return type(module).__name__.endswith(self.attention_class_suffix) and hasattr(module, self.qkv_names[0])

    def kept_modules(self, module: nn.Module) -> list[str]:
        names = [*self.qkv_names, self.output_name, *self.extra_modules]
        return [n for n in names if getattr(module, n, None) is not None]

    def geometry(self, attn: nn.Module) -> Geometry:
        config = attn.config
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_kv = getattr(config, "num_key_value_heads", None) or num_heads
        return Geometry(num_heads, num_kv, head_dim, config.hidden_size, float(attn.scaling))

    def raw_qkv(self, layer, hidden: torch.Tensor):
        B, T, _ = hidden.shape
        q, k, v = (getattr(layer, n)(hidden).view(B, T, -1, layer.head_dim) for n in self.qkv_names)
        return q, k, v

    def project(self, layer, hidden: torch.Tensor, kwargs: dict):
        q, k, v = self.raw_qkv(layer, hidden)
        if self.rope is not None:
            cos, sin = kwargs["position_embeddings"]
            q, k = self.rope(_seq_first(q), _seq_first(k), cos, sin)
            q, k = _seq_first(q), _seq_first(k)
        return q, k, v

    def output(self, layer, o: torch.Tensor) -> torch.Tensor:
        return getattr(layer, self.output_name)(o)


class QkNormProjections(SeparateProjections):
    """Qwen3 / Gemma 3: RMS norms on q and k per head before RoPE."""

    extra_modules = ("q_norm", "k_norm")

    def raw_qkv(self, layer, hidden):
        q, k, v = super().raw_qkv(layer, hidden)
        return layer.q_norm(q), layer.k_norm(k), v


class FusedNeoX(SeparateProjections):
    """GPT-NeoX / Pythia: one query_key_value linear laid out per head as [q | k | v]; partial rotary."""

    qkv_names = ("query_key_value",)
    output_name = "dense"

    def geometry(self, attn):
        config = attn.config
        return Geometry(config.num_attention_heads, config.num_attention_heads, attn.head_size,
                        config.hidden_size, float(attn.scaling))

    def raw_qkv(self, layer, hidden):
        B, T, _ = hidden.shape
        qkv = layer.query_key_value(hidden).view(B, T, layer.num_heads, 3 * layer.head_dim)
        return qkv.chunk(3, dim=-1)


class FusedGPT2(SeparateProjections):
    """GPT-2: one Conv1D c_attn producing [q | k | v] over the whole width; learned absolute positions."""

    qkv_names = ("c_attn",)
    output_name = "c_proj"
    extra_modules = ("resid_dropout",)
    uses_rope = False

    def is_attention(self, module):
        return type(module).__name__ == "GPT2Attention" and not getattr(module, "is_cross_attention", False)

    def geometry(self, attn):
        return Geometry(attn.num_heads, attn.num_heads, attn.head_dim, attn.embed_dim, float(attn.scaling))

    def raw_qkv(self, layer, hidden):
        B, T, _ = hidden.shape
        q, k, v = layer.c_attn(hidden).split(layer.num_heads * layer.head_dim, dim=2)
        return (x.view(B, T, layer.num_heads, layer.head_dim) for x in (q, k, v))

    def output(self, layer, o):
        return layer.resid_dropout(layer.c_proj(o))


class OPTProjections(SeparateProjections):
    """OPT: separate linears, out_proj, learned absolute positions; HF pre-scales q, we pass the scale instead."""

    output_name = "out_proj"
    uses_rope = False

    def geometry(self, attn):
        return Geometry(attn.num_heads, attn.num_heads, attn.head_dim, attn.embed_dim, float(attn.scaling))


ADAPTERS = {
    "llama": SeparateProjections,
    "mistral": SeparateProjections,
    "qwen2": SeparateProjections,
    "qwen3": QkNormProjections,
    "gemma3_text": QkNormProjections,
    "gpt_neox": FusedNeoX,
    "gpt2": FusedGPT2,
    "opt": OPTProjections,
}

def adapter_for(model_type: str):
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model_type)
