"""The DiJiang attention layer: RoPE'd q, k -> feature map -> decayed linear attention -> norm/gate -> W_o.

The layer is family-agnostic. A family adapter (``dijiang.adapters``) turns hidden states into post-RoPE
q, k, v and names the output projection; the layer keeps the pretrained projection modules under their
original attribute names, so a converted model's state dict still holds every pretrained weight under its
original key and adds only the new DiJiang parameters.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dijiang.feature_maps import (FEATURE_MAPS, QMC_KINDS, RADII, STABILISERS, HedgehogFeatureMap, ProjectedFeatureMap,
                                  build_feature_map)
from dijiang.hf_compat import DecodeWithoutStateError, find_cache
from dijiang.ops import linear_attention, window_attention
from dijiang.ops.delta import delta_rule
from dijiang.ops.triton_dijiang import fused_dijiang_attention, triton_supported
from dijiang.ops.triton_window import MAX_SINKS, fused_window_attention

MODES = ("chunk", "recurrent", "parallel")
MAX_WINDOW = 65536
BOOL_SETTINGS = ("normalize", "use_norm", "use_gate", "learn_decay", "checkpoint", "learn_projection",
                 "feature_transform", "decay_gate", "state_decay")
STATE_UPDATES = ("add", "delta")
CHOICES = {"stabiliser": STABILISERS, "qmc": QMC_KINDS, "radius": RADII, "state_update": STATE_UPDATES}


@dataclass
class DiJiangSettings:
    """How a softmax attention layer is replaced. Defaults are the best plain setting we measured.

    feature_map: registry name in ``dijiang.feature_maps`` (``dijiang``, ``official``, ``performer``, ``pff``,
        ``elu``; ``hedgehog``: Hedgehog's learned map, separate for queries and keys, always trained; the fused
        kernels take its log-features, in pure normalised layers and window layers).
    num_features: m, features per head (default head_dim, 2 head_dim for hedgehog; a multiple of head_dim for
        DCT-based maps, even for hedgehog).
    stabiliser: ``softmax`` (divide by the feature sum, official) or ``norm`` (||x||^2/2, unbiased).
    qmc / radius: the QMC sequence (sobol, halton) and radius law (``normal``: the paper's Phi^-1(u);
        ``chi``: chi_d radii, which give the frequencies the second moment of N(0, I)).
    window: 0 for pure DiJiang; W > 0 keeps exact softmax over the last W tokens and DiJiang beyond.
    normalize: divide by the linear-attention denominator (the paper's Eq. 4). Ignored when window > 0
        (the window hybrid always shares one normaliser between its two parts).
    use_norm / use_gate: the official output path, GroupNorm(one group per head) and a SiLU gate.
    decay_range: (1 - gamma) of the first and last head at init; RetNet's range.
    learn_projection: train the feature map's projection (initialised by the map's own construction, e.g. DCT
        x QMC radii) with the other new parameters, as Hedgehog/LoLCATs learn theirs. The fused kernel has no
        gradient for it, so training then takes the torch path.
    feature_transform: a learned per-head d x d map applied to q and k before the feature map of the linear
        part only (identity at init), so that the features can learn which directions to compare; the fused
        kernels see transformed q, k as ordinary inputs, so training keeps the fast path. The softmax window
        keeps the untransformed q, k.
    window_mix_init: the linear part's weight (softplus of ``window_mix``) at init, per head (with
        ``state_update="delta"`` the weight of the delta branch's output added to the window's).
    sinks: with a window, how many of the first tokens stay softmax keys of every query after they leave the
        window (StreamingLLM's attention sinks, inside the window's max and normaliser): a constant S more keys
        and values per layer. Pretrained models park much attention on the first tokens; a window without them
        loses it (``scripts/probe_layer_choice.py --sinks``).
    decay_gate: a data-dependent decay of the linear state (GLA's gate, from an existing projection): per token
        and head log gamma_t = logsigmoid(decay_logit_h + u_h . v_t), u zero at init (the learned per-head
        decay), so that the state can keep what matters and forget filler; in pure and window layers alike. On
        CUDA it runs through the fused kernels (the chunk kernel takes per-token decays).
    state_update: ``add`` (linear attention: S += k v^T, the paper's) or ``delta`` (the gated delta rule,
        S = gamma S + beta k (v - gamma S^T k)^T over L2-normalised features, no normaliser;
        ``dijiang.ops.delta``): the state overwrites what a key held instead of blurring it, the update
        DeltaNet showed recalls associations that additive states lose. beta_t = sigmoid(b_h + w_h . v_t) per
        token and head from v (w zero, b zero at init: beta 0.5). With a window the delta branch has no
        normaliser to share: the layer adds it to the window's own softmax output, o = window softmax (+ sinks)
        + softplus(window_mix) x delta output (Liger's sum of a sliding window and a gated linear branch), over
        every token, the window's too. Runs fla's Triton kernel on CUDA where fla is installed, else the
        PyTorch chunk form; the fast decoder does not take it (``model.generate`` does).
    state_decay: False (``state_update="delta"`` only) lets the state never decay, DeltaNet's rule, whose overwrite
        is its forgetting: no decay parameters, no gate; on CUDA fla's ungated ``chunk_delta_rule``, which trains
        where its gated kernel does not (``dijiang.ops.delta.fla_unusable``).
    full_kv_heads: a head hybrid (DuoAttention's split, inside converted layers): {layer: [key/value head, ...]}
        whose heads keep exact causal softmax over the whole context (and a growing key/value cache, those heads'
        only) while every other head of the layer runs the DiJiang op; the query heads a key/value head serves
        (grouped-query attention) go with it. Where the teacher retrieves is a few heads, not whole layers
        (``scripts/probe_layer_choice.py --compare-kv-heads``): at the same key/value memory a few kept heads
        keep more of it than kept layers. Layers not named are fully converted.
    checkpoint: in training, recompute the PyTorch attention op in the backward instead of keeping its chunk
        intermediates (the pure-torch window op kept ~59 GiB for SmolLM2 at 16 x 1024 tokens on an H100); the
        fused path on CUDA is not recomputed.
    backend: ``auto`` runs layers through the fused Triton kernels on CUDA when the feature map is a
        softmax-stabilised projection or Hedgehog's (its log-features, ``feature_map_fuses``) and no padding mask
        is present: pure layers through the fused chunk kernel (feature map inside the attention kernel),
        window hybrids through the banded softmax kernel plus the fused chunk kernel (when they start from an
        empty state: training, a first prefill).
        ``torch`` always uses the feature map + ``dijiang.ops`` path.
    """

    feature_map: str = "dijiang"
    num_features: int | None = None
    stabiliser: str = "softmax"
    qmc: str = "sobol"
    radius: str = "normal"
    seed: int = 0
    window: int = 0
    normalize: bool = True
    use_norm: bool = False
    use_gate: bool = False
    learn_decay: bool = True
    decay_range: tuple[float, float] = (1 / 32, 1 / 512)
    mode: str = "chunk"
    chunk_size: int = 64
    backend: str = "auto"
    checkpoint: bool = False
    learn_projection: bool = False
    feature_transform: bool = False
    window_mix_init: float = 0.1
    sinks: int = 0
    decay_gate: bool = False
    state_update: str = "add"
    state_decay: bool = True
    full_kv_heads: dict = field(default_factory=dict)

    def __post_init__(self):
        from dijiang.arguments import Number, non_negative_int, parse_bool, positive_float, positive_int

        self.decay_range = tuple(self.decay_range)
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {self.feature_map!r}; known: {sorted(FEATURE_MAPS)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        # a window longer than this is a typo (a 100000 window costs what the input needs, but its decode state
        # keeps `window` keys and values per layer)
        self.window = Number(int, 0, MAX_WINDOW).check("window (0 = pure linear attention)", self.window)
        if self.num_features is not None:
            self.num_features = positive_int.check("num_features", self.num_features)
        self.chunk_size = positive_int.check("chunk_size", self.chunk_size)
        self.seed = non_negative_int.check("seed", self.seed)
        for name in BOOL_SETTINGS:
            setattr(self, name, parse_bool(name, getattr(self, name)))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.backend not in ("auto", "torch"):
            raise ValueError(f"backend must be 'auto' (fused Triton kernel on CUDA where it applies) or 'torch', "
                             f"got {self.backend!r}")
        self.window_mix_init = positive_float.check("window_mix_init (the linear part's weight at init)",
                                                    self.window_mix_init)
        self.sinks = Number(int, 0, MAX_SINKS).check("sinks (first tokens kept as softmax keys)", self.sinks)
        if not self.state_decay and (self.state_update != "delta" or self.decay_gate):
            raise ValueError("state_decay=False (a state that never decays) is DeltaNet's rule: it needs "
                             f"state_update='delta' and no decay_gate; got state_update={self.state_update!r}, "
                             f"decay_gate={self.decay_gate}")
        self.full_kv_heads = _check_full_kv_heads(self.full_kv_heads)
        if self.sinks and not self.window:
            raise ValueError(f"sinks={self.sinks} needs a window (sinks are softmax keys next to it); got window=0")
        if len(self.decay_range) != 2:
            raise ValueError(f"decay_range must be two numbers (1 - gamma of the first and last head), "
                             f"got {self.decay_range}")
        low, high = self.decay_range
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1 for x in (low, high)):
            raise ValueError(f"decay_range entries are 1 - gamma and must lie in (0, 1), got {self.decay_range}")

    @classmethod
    def official(cls, **overrides) -> "DiJiangSettings":
        """The official repository's layer: its frozen feature map, no denominator, GroupNorm and SiLU gate."""
        base = dict(feature_map="official", normalize=False, use_norm=True, use_gate=True)
        return cls(**{**base, **overrides})

    @classmethod
    def from_any(cls, settings: "DiJiangSettings | dict | None") -> "DiJiangSettings":
        if settings is None:
            return cls()
        if isinstance(settings, cls):
            return settings
        if isinstance(settings, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(settings) - known
            if unknown:
                raise ValueError(f"unknown DiJiang settings {sorted(unknown)}; known: {sorted(known)}")
            return cls(**settings)
        raise ValueError(f"settings must be a DiJiangSettings, a dict or None, got {type(settings).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_full_kv_heads(heads) -> dict[int, tuple[int, ...]]:
    """{layer: sorted key/value heads}; layer keys may be strings of digits (a config read back from JSON)."""
    from dijiang.arguments import non_negative_int

    if not isinstance(heads, dict):
        raise ValueError(f"full_kv_heads must map layer -> [key/value head, ...], got {heads!r}")
    checked = {}
    for layer, kv_heads in heads.items():
        if isinstance(layer, str) and layer.isdigit():
            layer = int(layer)
        layer = non_negative_int.check("full_kv_heads: a layer index", layer)
        if isinstance(kv_heads, (str, bytes)) or not hasattr(kv_heads, "__iter__"):
            raise ValueError(f"full_kv_heads[{layer}] must be a list of key/value head indices, got {kv_heads!r}")
        kv_heads = [non_negative_int.check(f"full_kv_heads[{layer}]: a key/value head", h) for h in kv_heads]
        if not kv_heads or len(set(kv_heads)) != len(kv_heads):
            raise ValueError(f"full_kv_heads[{layer}] must name distinct key/value heads, got {kv_heads}")
        checked[layer] = tuple(sorted(kv_heads))
    return dict(sorted(checked.items()))


def _per_token_logit(bias: torch.Tensor, weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """b_h + w_h . v_t per token and head, [B, T, H] float32: the gates read from v (bias [H], weight [H, d])."""
    return bias.float() + torch.einsum("bthd,hd->bth", v.float(), weight.float())


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def initial_decay_logits(num_heads: int, decay_range: tuple[float, float]) -> torch.Tensor:
    """gamma_h = 1 - exp(linspace(ln lo, ln hi, H)) stored as logit(gamma) so that log gamma = logsigmoid <= 0."""
    low, high = decay_range
    one_minus_gamma = torch.exp(torch.linspace(math.log(low), math.log(high), num_heads, dtype=torch.float64))
    gamma = 1 - one_minus_gamma
    return torch.log(gamma / (1 - gamma)).float()


class DiJiangAttention(nn.Module):
    """Replaces one softmax attention module. Keeps the original projection modules as children."""

    def __init__(self, original: nn.Module, adapter, settings: DiJiangSettings, layer_idx: int, context):
        super().__init__()
        self.adapter = adapter
        self.settings = settings
        self.layer_idx = layer_idx
        self.context = context  # shared DecoderContext (not a module): the 2-D mask and cache of this forward
        geometry = adapter.geometry(original)
        self.num_heads, self.num_kv_heads, self.head_dim = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
        self.scale = geometry.scale
        for name in adapter.kept_modules(original):
            self.add_module(name, getattr(original, name))
        for name in adapter.kept_attributes:
            setattr(self, name, getattr(original, name))

        H, d = self.num_heads, self.head_dim
        param = next(original.parameters())
        factory = dict(device=param.device, dtype=param.dtype)
        self.feature_map = build_feature_map(
            settings.feature_map, d, H, settings.num_features, scale=self.scale,
            stabiliser=settings.stabiliser, seed=settings.seed + layer_idx, qmc=settings.qmc,
            radius=settings.radius, learn_projection=settings.learn_projection,
        ).to(**factory)
        # Hedgehog (as LoLCATs) trains a key map apart from the query map, both from the same init.
        self.key_feature_map = copy.deepcopy(self.feature_map) if self.feature_map.separate_key_map else None
        logits = initial_decay_logits(H, settings.decay_range).to(param.device)
        if settings.learn_decay and settings.state_decay:
            self.decay_logit = nn.Parameter(logits)
        else:
            self.register_buffer("decay_logit", logits)
        hidden = geometry.hidden_size
        self.gate = nn.Linear(hidden, H * d, bias=False, **factory) if settings.use_gate else None
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=hidden**-0.5)
        self.norm = nn.GroupNorm(H, H * d, **factory) if settings.use_norm else None
        # The default 0.1 starts close to the plain sliding window. On SmolLM2 before any training this gave
        # pydoc perplexity 55 against 91 for a mix of 1 and 64 for no linear part at all.
        mix = _inverse_softplus(settings.window_mix_init)
        self.window_mix = nn.Parameter(torch.full((H,), mix, device=param.device)) if settings.window else None
        self.feature_transform = (nn.Parameter(torch.eye(d, **factory).repeat(H, 1, 1))
                                  if settings.feature_transform else None)
        self.decay_gate = nn.Parameter(torch.zeros(H, d, **factory)) if settings.decay_gate else None
        delta = settings.state_update == "delta"
        self.delta_beta = nn.Parameter(torch.zeros(H, d, **factory)) if delta else None
        self.delta_beta_logit = nn.Parameter(torch.zeros(H, device=param.device)) if delta else None
        self.full_kv_heads = settings.full_kv_heads.get(layer_idx, ())
        if any(h >= self.num_kv_heads for h in self.full_kv_heads):
            raise ValueError(f"full_kv_heads[{layer_idx}] = {list(self.full_kv_heads)}: layer {layer_idx} has "
                             f"{self.num_kv_heads} key/value heads (0-{self.num_kv_heads - 1})")
        groups = self.num_heads // self.num_kv_heads  # the query heads each key/value head serves
        self.full_query_heads = [kv * groups + g for kv in self.full_kv_heads for g in range(groups)]

    @property
    def log_decay(self) -> torch.Tensor:
        if not self.settings.state_decay:  # DeltaNet's state: gamma = 1
            return torch.zeros_like(self.decay_logit, dtype=torch.float32)
        return F.logsigmoid(self.decay_logit.float())

    def step_log_decay(self, v: torch.Tensor) -> torch.Tensor:
        """The linear state's log decay: per head [H], or with ``decay_gate`` per token [B, T, H] from v (heads
        expanded), float32."""
        if self.decay_gate is None:
            return self.log_decay
        return F.logsigmoid(_per_token_logit(self.decay_logit, self.decay_gate, v))

    def write_strength(self, v: torch.Tensor) -> torch.Tensor:
        """The delta rule's beta_t = sigmoid(b_h + w_h . v_t), [B, T, H] float32."""
        return torch.sigmoid(_per_token_logit(self.delta_beta_logit, self.delta_beta, v))

    def linear_inputs(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The q, k the linear part's feature map sees: ``feature_transform`` applied per head, if any."""
        if self.feature_transform is None:
            return q, k
        transform = self.feature_transform.to(q.dtype)
        return torch.einsum("bthd,hde->bthe", q, transform), torch.einsum("bthd,hde->bthe", k, transform)

    @property
    def key_map(self):
        """The feature map applied to keys: its own where the map trains one apart, else the query map."""
        return self.feature_map if self.key_feature_map is None else self.key_feature_map

    def new_parameters(self):
        """Parameters DiJiang added (everything else in the layer is pretrained)."""
        kept = {id(p) for name in self.adapter.kept_modules(self) for p in getattr(self, name).parameters()}
        return [p for p in self.parameters() if id(p) not in kept]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        B, T, _ = hidden_states.shape
        q, k, v = self.adapter.project(self, hidden_states, kwargs)  # [B, T, H(kv), d], post-RoPE
        kv_heads = list(self.full_kv_heads)
        full_kv = (k[:, :, kv_heads], v[:, :, kv_heads]) if kv_heads else None
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        cache = find_cache(args, kwargs)  # past_key_values, cache or layer_past, depending on family and release
        self._refuse_decode_without_state(cache, T, kwargs.get("position_ids"))
        layer_cache = _layer_cache(cache, self.layer_idx)
        initial_state = layer_cache.state if layer_cache is not None else None
        mask = self.context.current(T)
        mode = "recurrent" if T == 1 else self.settings.mode
        # under autocast RoPE hands back float32 q, k next to a bf16 v: the kernels take one dtype, v's
        q_fused, k_fused = (q, k) if q.dtype == v.dtype or not q.is_cuda else (q.to(v.dtype), k.to(v.dtype))
        if self._can_fuse(q_fused, v, mode, mask, initial_state):
            o, state = self._fused(q_fused, k_fused, v, initial_state, layer_cache is not None)
        else:
            attend = functools.partial(self._attend, mode=mode, mask=mask, initial_state=initial_state,
                                       output_final_state=layer_cache is not None)
            if self.settings.checkpoint and self.training and torch.is_grad_enabled():
                o, state = torch.utils.checkpoint.checkpoint(attend, q, k, v, use_reentrant=False)
            else:
                o, state = attend(q, k, v)
        if full_kv is not None:
            o = self._full_heads(o, q, *full_kv, layer_cache)
        return self._finish(o, state, layer_cache, hidden_states)

    def _full_heads(self, o, q, k_full, v_full, layer_cache):
        """Overwrite the query heads of ``full_kv_heads`` with exact causal softmax over every key so far (the
        ones cached by earlier calls first). k_full, v_full: [B, T, n, d], those key/value heads only."""
        groups, heads = self.num_heads // self.num_kv_heads, self.full_query_heads
        if layer_cache is not None:
            k_full, v_full = layer_cache.update_full_heads(k_full, v_full)
        T, S = q.shape[1], k_full.shape[1]
        q_sel = q[:, :, heads].to(v_full.dtype).transpose(1, 2)  # [B, n x groups, T, d]
        k_sel = k_full.to(v_full.dtype).repeat_interleave(groups, dim=2).transpose(1, 2)
        v_sel = v_full.repeat_interleave(groups, dim=2).transpose(1, 2)
        padding = self.context.mask
        if padding is None and T == S:
            out = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, is_causal=True, scale=self.scale)
        else:
            # the T queries are the last T of S positions; a padding key is never seen, and a padding query
            # (left padding) sees itself so that its row is not empty (its output is masked downstream anyway)
            rows = torch.arange(S - T, S, device=q.device)[:, None]
            cols = torch.arange(S, device=q.device)[None, :]
            allowed = (cols <= rows)[None, None]
            if padding is not None:
                allowed = allowed & padding[:, -S:].bool()[:, None, None, :]
                allowed = allowed | (cols == rows)[None, None]
            out = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, attn_mask=allowed, scale=self.scale)
        index = torch.tensor(heads, device=o.device)
        return o.index_copy(2, index, out.transpose(1, 2).to(o.dtype))

    def _refuse_decode_without_state(self, cache, num_tokens: int, position_ids) -> None:
        """Without its state a converted layer would attend to the new tokens alone: a wrong answer, no error."""
        if cache is not None:
            return
        if self.context.cache is not None:
            raise DecodeWithoutStateError(
                f"layer {self.layer_idx}: the decoder runs with a {type(self.context.cache).__name__} but called "
                "this layer without it (has transformers renamed the cache argument? see dijiang.hf_compat)"
            )
        if num_tokens == 1 and position_ids is not None and bool((position_ids > 0).any()):
            raise DecodeWithoutStateError(
                f"layer {self.layer_idx}: one token at position {int(position_ids.max())} and no cache: a converted "
                "layer continues a sequence only from its recurrent state (pass the DiJiangCache the previous "
                "call returned, or run the whole sequence)"
            )

    def _attend(self, q, k, v, *, mode, mask, initial_state, output_final_state):
        q_lin, k_lin = self.linear_inputs(q, k)
        qf, kf = self.feature_map(q_lin), self.key_map(k_lin)
        if self.delta_beta is not None and self.settings.window:
            window_state, delta_state = _split_delta_state(initial_state)
            # the window's softmax alone: features of width 0 give its linear part nothing to add and a linear
            # state of no size ([B, H, 0, dv]), so the cache holds only the window and the delta state
            zeros = qf.new_zeros(*qf.shape[:-1], 0)
            o, state = window_attention(
                q, k, v, zeros, zeros, self.log_decay, torch.ones_like(self.log_decay), window=self.settings.window,
                scale=self.scale, mode=mode, initial_state=window_state, output_final_state=output_final_state,
                attention_mask=mask, sinks=self.settings.sinks,
            )
            return self._add_delta_branch(o, state, qf, kf, v, mode, mask, delta_state, output_final_state)
        if self.delta_beta is not None:
            return self._delta(qf, kf, v, mode, mask, initial_state, output_final_state)
        if self.settings.window:
            lin_weight = F.softplus(self.window_mix.float())
            return window_attention(
                q, k, v, qf, kf, self.step_log_decay(v), lin_weight, window=self.settings.window, scale=self.scale,
                mode=mode, initial_state=initial_state, output_final_state=output_final_state, attention_mask=mask,
                sinks=self.settings.sinks,
            )
        return linear_attention(
            qf, kf, v, self.step_log_decay(v), mode=mode, chunk_size=self.settings.chunk_size,
            initial_state=initial_state, output_final_state=output_final_state, normalize=self.settings.normalize,
            attention_mask=mask,
        )

    def _delta(self, qf, kf, v, mode, mask, initial_state, output_final_state):
        """The gated delta rule over this layer's features (``dijiang.ops.delta``)."""
        # unit-norm features: I - beta k k^T is then a contraction and reads are comparable across tokens; float32
        # (the PyTorch forms compute in it; fla's kernel takes them in v's dtype)
        qf, kf = F.normalize(qf.float(), dim=-1), F.normalize(kf.float(), dim=-1)
        return delta_rule(
            qf, kf, v, self.step_log_decay(v) if self.settings.state_decay else None, self.write_strength(v),
            mode="recurrent" if mode == "recurrent"
            else "chunk", chunk_size=self.settings.chunk_size, initial_state=initial_state,
            output_final_state=output_final_state, attention_mask=mask, backend=self.settings.backend,
        )

    def _add_delta_branch(self, o, window_state, qf, kf, v, mode, mask, delta_state, output_final_state):
        """A window layer's output plus softplus(window_mix) x the delta branch's; the state holds both."""
        o_delta, delta_state = self._delta(qf, kf, v, mode, mask, delta_state, output_final_state)
        weight = F.softplus(self.window_mix.float())[:, None]
        o = (o.float() + weight * o_delta.float()).to(v.dtype)
        return o, (dict(window_state, delta=delta_state) if output_final_state else None)

    def _kernel_inputs(self, q_lin, k_lin, v):
        """What the fused kernels take for this layer's feature map: (q and k of the linear part, projection P,
        log weights, the features' temperature, c), the kernels' features being phi / c. A projection map is
        its own (c = 1). Hedgehog's map: its log-features (the queries' and the keys' maps) and an identity P, no
        temperature: the kernels' softmax over m of them is phi / feature_sum; the map's weights get their
        gradients through log_features (autograd)."""
        fm = self.feature_map
        if not isinstance(fm, HedgehogFeatureMap):
            return q_lin, k_lin, fm.projection, fm.log_weight, fm.scale, 1.0
        q_log, k_log = fm.log_features(q_lin).to(v.dtype), self.key_map.log_features(k_lin).to(v.dtype)
        return q_log, k_log, torch.eye(fm.num_features, device=v.device), None, 1.0, fm.feature_sum

    def _fused(self, q, k, v, initial_state, want_state):
        """The layer through the fused kernels: the window op (banded softmax + chunk kernel), or the chunk
        kernel alone. With features phi / c (``_kernel_inputs``) the linear numerator and denominator are / c^2:
        beside the softmax window the linear weight goes in x c^2; alone, the normaliser cancels it (eps / c^2
        matches the torch path's). The states come out / c and are scaled back."""
        q_lin, k_lin = self.linear_inputs(q, k)
        if self.delta_beta is not None:  # a window layer with a delta branch: the band kernel, then fla's
            o, state = fused_window_attention(
                q, k, v, None, None, self.log_decay, torch.ones_like(self.log_decay),
                window=self.settings.window, scale=self.scale, output_final_state=want_state,
                sinks=self.settings.sinks, linear=False,
            )
            qf, kf = self.feature_map(q_lin), self.key_map(k_lin)
            return self._add_delta_branch(o, state, qf, kf, v, "chunk", None, None, want_state)
        q_lin, k_lin, proj, log_weight, feature_scale, c = self._kernel_inputs(q_lin, k_lin, v)
        if self.settings.window:
            o, state = fused_window_attention(
                q, k, v, proj, log_weight, self.step_log_decay(v), F.softplus(self.window_mix.float()) * c**2,
                window=self.settings.window, scale=self.scale, feature_scale=feature_scale,
                output_final_state=want_state, q_lin=q_lin, k_lin=k_lin, sinks=self.settings.sinks,
            )
            if state is not None and c != 1:
                state = dict(state, S=state["S"] * c, kf=state["kf"] * c)
            return o, state
        if initial_state is not None and c != 1:
            initial_state = initial_state / c
        o, state = fused_dijiang_attention(
            q_lin, k_lin, v, proj, log_weight, self.step_log_decay(v), scale=feature_scale,
            normalize=self.settings.normalize, initial_state=initial_state, output_final_state=want_state,
            chunk_size=self.settings.chunk_size, eps=1e-6 / c**2,  # linear_attention's eps, the torch path's
        )
        return o, state if state is None or c == 1 else state * c

    def feature_map_fuses(self) -> bool:
        """Whether the fused kernels can compute this layer's feature map: one softmax-stabilised projection
        map for q and k, with a projection that needs no gradient (the kernels have none for it); or Hedgehog's
        map in a window layer or a normalised pure one (the kernels take its log-features, whose 1 / feature_sum
        a normaliser must absorb: ``_kernel_inputs``)."""
        fm = self.feature_map
        if isinstance(fm, HedgehogFeatureMap):
            return bool(self.settings.window) or self.settings.normalize
        return (isinstance(fm, ProjectedFeatureMap) and fm.stabiliser == "softmax" and self.key_feature_map is None
                and not (fm.projection.requires_grad and torch.is_grad_enabled()))

    def _can_fuse(self, q: torch.Tensor, v: torch.Tensor, mode: str, mask, initial_state) -> bool:
        fm = self.feature_map
        common = (self.settings.backend == "auto" and q.is_cuda and mode == "chunk" and mask is None)
        if not common:
            return False
        if self.delta_beta is not None:  # pure: the delta op picks fla itself; window: the band kernel beside it
            return (bool(self.settings.window) and initial_state is None
                    and triton_supported(q, q, v, None)[0])
        if not self.feature_map_fuses():
            return False
        if isinstance(fm, HedgehogFeatureMap):  # the linear part's inputs: m log-features a token, an m x m identity
            m = fm.num_features
            lin, proj = q.new_empty(()).expand(*q.shape[:-1], m), q.new_empty(()).expand(m, m)
        else:
            lin, proj = q, fm.projection
        if self.settings.window:  # the fused window op starts from an empty state (training, a first prefill)
            return (initial_state is None and triton_supported(q, q, v, proj)[0]
                    and (lin is q or triton_supported(lin, lin, v, proj)[0]))
        return triton_supported(lin, lin, v, proj, self.settings.chunk_size)[0]

    def _finish(self, o, state, layer_cache, hidden_states):
        B, T, _ = hidden_states.shape
        if layer_cache is not None:
            layer_cache.update_state(state, T)
        o = o.reshape(B, T, self.num_heads * self.head_dim)
        if self.norm is not None:
            o = self.norm(o.reshape(B * T, -1)).reshape(B, T, -1)
        if self.gate is not None:
            o = F.silu(self.gate(hidden_states)) * o
        return self.adapter.output(self, o.to(hidden_states.dtype)), None


def gate_summary(layers) -> dict:
    """Where the learned gates stand across converted layers (logged during training, to see them move):
    the linear part's weight softplus(window_mix), each layer's slowest decay gamma and, with decay_gate, how large
    the gate vectors u have grown (their largest L2 norm over heads and layers; 0 at init)."""
    layers = list(layers)
    if not layers:
        return {}
    slowest = torch.stack([layer.log_decay.detach().max().exp() for layer in layers])
    summary = {"slowest_gamma_min": slowest.min().item(), "slowest_gamma_max": slowest.max().item()}
    mixes = [F.softplus(layer.window_mix.detach().float()) for layer in layers if layer.window_mix is not None]
    if mixes:
        mix = torch.cat(mixes)
        summary.update(mix_min=mix.min().item(), mix_mean=mix.mean().item(), mix_max=mix.max().item())
    gates = [layer.decay_gate.detach().float().norm(dim=-1) for layer in layers if layer.decay_gate is not None]
    if gates:
        summary["gate_norm_max"] = torch.cat(gates).max().item()
    return summary


def _split_delta_state(state: dict | None) -> tuple[dict | None, torch.Tensor | None]:
    """A window + delta layer's state: (the window op's dict, the delta state), or (None, None)."""
    if state is None:
        return None, None
    window_state = {key: value for key, value in state.items() if key != "delta"}
    return window_state, state["delta"]


def _layer_cache(cache, layer_idx: int):
    if cache is None:
        return None
    from dijiang.cache import DiJiangCache

    if not isinstance(cache, DiJiangCache):
        raise ValueError(
            f"converted layers need a dijiang.DiJiangCache, got {type(cache).__name__}; let the model create it "
            "(pass no cache, or DiJiangCache.for_model(model) as the model's cache argument)"
        )
    return cache.layers[layer_idx]


@dataclass
class DecoderContext:
    """What the decoder stack's current forward got, shared by all converted layers of one model: the 2-D
    padding mask (None without padding) and the cache (None when it runs without one)."""

    mask: torch.Tensor | None = field(default=None)
    cache: object | None = field(default=None)

    def current(self, num_tokens: int) -> torch.Tensor | None:
        if self.mask is None:
            return None
        return self.mask[:, -num_tokens:]
