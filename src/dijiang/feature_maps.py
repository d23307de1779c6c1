"""Feature maps phi: [..., H, d] -> [..., H, m] with phi(q).phi(k) ~ exp(scale * q.k).

Every map is an ``nn.Module`` built through :func:`build_feature_map`; names live in
``FEATURE_MAPS``. Maps with an exponential form share one forward: ``z = sqrt(scale) x @ P``
(one frozen projection buffer ``P [d, m]``), then a stabiliser:

* ``softmax``: ``phi = softmax_m(z + log_weight)`` (the official code's division by the feature sum);
* ``norm``: ``phi = exp(log_weight + z - scale ||x||^2 / 2) / sqrt(m)``, the positive-random-feature
  estimator, unbiased for ``exp(scale q.k)`` when the frequencies (columns of P) are N(0, I).

Frequency constructions (columns of P):

* ``performer``: i.i.d. N(0, I) frequencies (plain Monte Carlo).
* ``pff``: random orthogonal directions times QMC radii (no DCT, no weights).
* ``dijiang``: orthonormal DCT-II directions times QMC radii, learnable per-head weights.
* ``official``: the official repository's ``DCT @ diag(Phi^-1(torch.rand))``, frozen, softmax.
* ``elu``: ``elu(x) + 1`` (no kernel estimator; stabiliser ignored).
* ``hedgehog``: Hedgehog's learned map (Zhang et al. 2024; LoLCATs, Lizard), ``[softmax(x W_h), softmax(-x W_h)]``
  with a trained per-head ``W_h [d, m/2]`` initialised as the identity, separate maps for queries and keys
  (no kernel estimator to stabilise; no temperature, W learns it).

Radii (``radius=``): ``"normal"`` (paper) uses t = Phi^-1(u), a signed N(0, 1) radius. A frequency
w = t c with a unit direction c then has E[w w^T] = c c^T, so averaged over a full orthonormal block
the second moment is I / d, not I: the estimator tracks exp(scale q.k / d) to second order, i.e. a
much flatter kernel than the softmax it replaces, and it is biased for every m. ``"chi"`` uses a
signed chi_d radius (|t| ~ chi_d, sign from the QMC point), so with Haar-random orthonormal
directions (``pff``) every frequency is exactly N(0, I) and the ``norm`` estimator is unbiased. With
the *fixed* DCT directions no radius law makes it unbiased (frequencies lie on d fixed lines, so
their distribution cannot be Gaussian), but ``chi`` at least gets the second moment right.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable

import numpy as np
import scipy.fft
import scipy.stats
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FEATURE_MAPS",
    "FeatureMap",
    "ProjectedFeatureMap",
    "register_feature_map",
    "build_feature_map",
    "dct_matrix",
    "qmc_uniforms",
    "qmc_radii",
    "approximation_error",
]

FEATURE_MAPS: dict[str, type] = {}
STABILISERS = ("softmax", "norm")
QMC_KINDS = ("sobol", "halton", "random")  # "random": i.i.d. uniforms, the Monte-Carlo control
RADII = ("normal", "chi")


def register_feature_map(name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        FEATURE_MAPS[name] = cls
        cls.name = name
        return cls

    return decorate


# ---------------------------------------------------------------------------------------------
# Building blocks (numpy, float64; all seeded locally, no global RNG)
# ---------------------------------------------------------------------------------------------


def dct_matrix(d: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C [d, d]: row k is the k-th cosine basis vector, so C @ x = DCT(x)."""
    return scipy.fft.dct(np.eye(d), norm="ortho", axis=0)


def qmc_uniforms(n: int, dim: int, kind: str = "sobol", seed: int = 0) -> np.ndarray:
    """n points of a scrambled, seeded QMC sequence in (0, 1)^dim, shape [n, dim] (or i.i.d. for "random")."""
    rng = np.random.default_rng(seed)
    if kind == "sobol":
        engine = scipy.stats.qmc.Sobol(d=dim, scramble=True, seed=rng)
        with warnings.catch_warnings():  # n not a power of two: balance warning, still a valid QMC set
            warnings.simplefilter("ignore", UserWarning)
            u = engine.random(n)
    elif kind == "halton":
        u = scipy.stats.qmc.Halton(d=dim, scramble=True, seed=rng).random(n)
    elif kind == "random":
        u = rng.random((n, dim))
    else:
        raise ValueError(f"qmc must be one of {QMC_KINDS}, got {kind!r}")
    # Scrambled points are never exactly 0 or 1 in practice; clip so Phi^-1 stays finite regardless.
    eps = np.finfo(np.float64).eps
    return np.clip(u, eps, 1.0 - eps)


def qmc_radii(u: np.ndarray, radius: str, d: int) -> np.ndarray:
    """Map uniforms to signed radii: N(0, 1) quantiles ("normal") or signed chi_d quantiles ("chi")."""
    if radius == "normal":
        return scipy.stats.norm.ppf(u)
    if radius == "chi":
        # Fold u around 1/2: the sign comes from the half, the magnitude is the chi_d quantile of |2u - 1|.
        return np.sign(u - 0.5) * scipy.stats.chi.ppf(np.abs(2.0 * u - 1.0), d)
    raise ValueError(f"radius must be one of {RADII}, got {radius!r}")


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-distributed orthogonal matrix (QR of a Gaussian with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))[None, :]


def check_stabiliser(stabiliser: str) -> None:
    if stabiliser not in STABILISERS:
        raise ValueError(f"stabiliser must be one of {STABILISERS}, got {stabiliser!r}")


def _num_blocks(name: str, head_dim: int, num_features: int) -> int:
    if num_features % head_dim != 0:
        raise ValueError(
            f"feature map {name!r} needs num_features to be a multiple of head_dim={head_dim} "
            f"(k blocks of d features), got num_features={num_features}"
        )
    return num_features // head_dim


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class FeatureMap(nn.Module):
    """Base class: x [..., H, d] -> [..., H, m], output in x.dtype, computed in fp32."""

    name = "base"
    fp32_tensors: tuple[str, ...] = ()  # attributes (parameters, buffers) kept fp32 under a module dtype cast
    separate_key_map = False  # True: the layer gives keys their own copy of the map, trained apart
    always_trained = False  # True: the map's own weights always train (learn_projection is implied)

    def __init__(self, head_dim: int, num_heads: int, num_features: int, scale: float | None = None):
        super().__init__()
        if head_dim < 1 or num_heads < 1:
            raise ValueError(f"head_dim and num_heads must be >= 1, got head_dim={head_dim}, num_heads={num_heads}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_features = num_features
        self.scale = float(head_dim**-0.5 if scale is None else scale)
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")

    @classmethod
    def default_num_features(cls, head_dim: int) -> int:
        return head_dim

    def _apply(self, fn, recurse=True):
        # model.to(bf16) / .half() must not round the map's own weights: keep them fp32, follow only the device.
        # detach() holds on to the fp32 tensor: a Parameter's .data is swapped in place by the cast
        fp32_tensors = {name: getattr(self, name).detach() for name in self.fp32_tensors}
        out = super()._apply(fn, recurse)
        for name, fp32 in fp32_tensors.items():
            tensor = getattr(self, name)
            if tensor.dtype == torch.float32:
                continue
            if isinstance(tensor, nn.Parameter):
                tensor.data = fp32.to(device=tensor.device)
            else:
                setattr(self, name, fp32.to(device=tensor.device))
        return out

    def check_input(self, x: Tensor) -> None:
        if x.dim() < 2 or tuple(x.shape[-2:]) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"{self.name} feature map expects input [..., H={self.num_heads}, d={self.head_dim}], "
                f"got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"d={self.head_dim}, H={self.num_heads}, m={self.num_features}, scale={self.scale:.4g}"


class ProjectedFeatureMap(FeatureMap):
    """exp-type map: z = sqrt(scale) x @ P, then the stabiliser. Subclasses build P [d, m] (float64)."""

    learnable_weights = False
    fp32_tensors = ("projection",)

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        num_features: int,
        *,
        scale: float | None = None,
        stabiliser: str = "softmax",
        seed: int = 0,
        qmc: str = "sobol",
        radius: str = "normal",
        learn_projection: bool = False,
    ):
        super().__init__(head_dim, num_heads, num_features, scale)
        check_stabiliser(stabiliser)
        if qmc not in QMC_KINDS:
            raise ValueError(f"qmc must be one of {QMC_KINDS}, got {qmc!r}")
        if radius not in RADII:
            raise ValueError(f"radius must be one of {RADII}, got {radius!r}")
        self.stabiliser = stabiliser
        self.seed, self.qmc, self.radius = seed, qmc, radius
        projection = torch.as_tensor(self.build_projection(), dtype=torch.float32)
        assert projection.shape == (head_dim, num_features), projection.shape
        if learn_projection:  # initialised by the method's construction, then trained (Hedgehog-style)
            self.projection = nn.Parameter(projection.contiguous())
        else:
            self.register_buffer("projection", projection.contiguous(), persistent=True)
        if self.learnable_weights:
            self.log_weight = nn.Parameter(torch.zeros(num_heads, num_features))
        else:
            self.register_parameter("log_weight", None)

    def build_projection(self) -> np.ndarray | Tensor:
        raise NotImplementedError

    def log_features(self, x: Tensor) -> Tensor:
        """Unstabilised log-features log w + sqrt(scale) x @ P in fp32."""
        z = (x.float() * math.sqrt(self.scale)) @ self.projection
        if self.log_weight is not None:
            z = z + self.log_weight.float()
        return z

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        z = self.log_features(x)
        if self.stabiliser == "softmax":
            phi = torch.softmax(z, dim=-1)
        else:
            phi = self.norm_features(x, z)
        return phi.to(x.dtype)

    def norm_features(self, x: Tensor, z: Tensor) -> Tensor:
        sq_norm = x.float().pow(2).sum(-1, keepdim=True) * (self.scale / 2)
        log_phi = z - sq_norm - 0.5 * math.log(self.num_features)
        # Overflow guard: cap each log-feature so that a sum of m products phi_i(q) phi_i(k) stays below
        # the output dtype's max. A cap (not a per-token shift) keeps the estimator untouched wherever it
        # is representable at all; capped tokens are ones whose estimate would be inf anyway.
        out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        cap = 0.5 * (math.log(torch.finfo(out_dtype).max) - math.log(self.num_features)) - 1.0
        return torch.exp(log_phi.clamp(max=cap))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stabiliser={self.stabiliser}"


@register_feature_map("dijiang")
class DiJiangFeatureMap(ProjectedFeatureMap):
    """phi(x) = w * exp(t * (C x) - s(x)): DCT-II directions, QMC radii per DCT block, learnable w per head.

    P = [C^T diag(t_1) | ... | C^T diag(t_k)] so that x @ P = (t_b * (C x)) per block b. (The official
    code uses C diag(t), i.e. x @ C = C^T x, the inverse DCT; any orthonormal basis works, we follow the
    paper's C x.) Block b takes its radii from dimension b of a k-dimensional scrambled QMC sequence of
    d points, so each block's radii are stratified on their own.
    """

    learnable_weights = True

    def build_projection(self) -> np.ndarray:
        d = self.head_dim
        blocks = _num_blocks(self.name, d, self.num_features)
        radii = qmc_radii(qmc_uniforms(d, blocks, self.qmc, self.seed), self.radius, d)  # [d, k]
        c_t = dct_matrix(d).T
        return np.concatenate([c_t * radii[None, :, b] for b in range(blocks)], axis=1)


@register_feature_map("pff")
class PFFFeatureMap(ProjectedFeatureMap):
    """Positive fixed features: QMC radii along Haar-random orthonormal directions (no DCT, no weights)."""

    def build_projection(self) -> np.ndarray:
        d = self.head_dim
        blocks = _num_blocks(self.name, d, self.num_features)
        radii = qmc_radii(qmc_uniforms(d, blocks, self.qmc, self.seed), self.radius, d)
        rng = np.random.default_rng([self.seed, 1])  # independent of the QMC scramble stream
        return np.concatenate([random_orthogonal(d, rng) * radii[None, :, b] for b in range(blocks)], axis=1)


@register_feature_map("performer")
class PerformerFeatureMap(ProjectedFeatureMap):
    """Positive random features with i.i.d. N(0, I) frequencies (plain Monte Carlo), any m."""

    def build_projection(self) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.head_dim, self.num_features, generator=gen, dtype=torch.float64)


@register_feature_map("official")
class OfficialFeatureMap(ProjectedFeatureMap):
    """The official repository's map: softmax(x @ C @ diag(Phi^-1(u))), u the diagonal of torch.rand(d, d).

    Reproduced operation for operation (including icdf(0) = -inf -> 0 and the x @ C orientation), with
    torch.rand drawn from a local generator seeded with ``seed`` (== global torch.manual_seed(seed)).
    The official code applies no temperature; pass scale=1.0 to reproduce it literally. m must equal d.
    """

    def __init__(self, head_dim: int, num_heads: int, num_features: int, **kwargs):
        if num_features != head_dim:
            raise ValueError(f"feature map 'official' needs num_features == head_dim={head_dim}, got {num_features}")
        super().__init__(head_dim, num_heads, num_features, **kwargs)

    def build_projection(self) -> Tensor:
        # Built on the CPU whatever the default device: from_pretrained constructs modules under a meta-device
        # context, where torch.distributions.Normal's argument check calls .item() and fails. Normal(0, 1).icdf
        # is exactly sqrt(2) erfinv(2u - 1).
        d = self.head_dim
        gen = torch.Generator().manual_seed(self.seed)
        uniforms = torch.diag_embed(torch.diag(torch.rand(d, d, generator=gen, device="cpu")))
        icdf = torch.erfinv(2 * uniforms - 1) * math.sqrt(2)
        icdf = torch.where(torch.isinf(icdf), torch.zeros_like(icdf), icdf)
        dct = torch.from_numpy(dct_matrix(d)).float()
        return dct @ icdf


@register_feature_map("elu")
class EluFeatureMap(FeatureMap):
    """elu(sqrt(scale) x) + 1 (linear-transformer baseline); m == d; no stabiliser (argument ignored)."""

    def __init__(self, head_dim: int, num_heads: int, num_features: int, *, scale=None, stabiliser="softmax", **_):
        if num_features != head_dim:
            raise ValueError(f"feature map 'elu' needs num_features == head_dim={head_dim}, got {num_features}")
        check_stabiliser(stabiliser)
        super().__init__(head_dim, num_heads, num_features, scale)
        self.log_weight = None

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return (F.elu(x.float() * math.sqrt(self.scale)) + 1.0).to(x.dtype)


@register_feature_map("hedgehog")
class HedgehogFeatureMap(FeatureMap):
    """Hedgehog's learned map: phi(x) = [softmax(x W_h), softmax(-x W_h)] per head h, W_h [d, m/2] trained.

    Zhang et al. 2024 ("The Hedgehog & the Porcupine"), the map LoLCATs and Lizard convert with. W starts as
    the identity (m/2 == d, the default m = 2d; otherwise the rectangular identity, as LoLCATs falls back to)
    and is trained with the layer's other new parameters, e.g. by attention transfer. No temperature is
    applied: the peers apply none to raw q, k, and W can learn one. No bias: LoLCATs' configs ship without
    one (its optional bias is one scalar per head, which the softmax cancels). Queries and keys get separate
    maps from the same init (``separate_key_map``), as LoLCATs' configs have them. The stabiliser is checked
    and ignored (the map is its own softmax), as for elu. Layers with this map run the fused kernels on
    ``log_features`` with an identity projection (window layers, and pure ones that normalise).
    """

    fp32_tensors = ("weight",)
    separate_key_map = True
    always_trained = True

    def __init__(self, head_dim: int, num_heads: int, num_features: int, *, scale=None, stabiliser="softmax", **_):
        if num_features % 2:
            raise ValueError(f"feature map 'hedgehog' needs an even num_features (two halves of m/2), "
                             f"got {num_features}")
        check_stabiliser(stabiliser)
        super().__init__(head_dim, num_heads, num_features, scale)
        self.log_weight = None
        identity = torch.eye(head_dim, num_features // 2)
        self.weight = nn.Parameter(identity.expand(num_heads, -1, -1).clone())  # [H, d, m/2]

    @classmethod
    def default_num_features(cls, head_dim: int) -> int:
        return 2 * head_dim  # identity init: one softmax half per sign of x

    # every token's features sum to this (one softmax per half): the fused kernels' softmax of log_features is
    # phi / feature_sum, which a normalised attention cancels (DiJiangAttention's fused path for this map)
    feature_sum = 2.0

    def _logits(self, x: Tensor) -> Tensor:
        return torch.einsum("...hd,hdf->...hf", x.float(), self.weight.float())  # x W_h, fp32

    def log_features(self, x: Tensor) -> Tensor:
        """log phi(x) in fp32: [log_softmax(x W_h), log_softmax(-x W_h)]."""
        z = self._logits(x)
        return torch.cat([torch.log_softmax(z, dim=-1), torch.log_softmax(-z, dim=-1)], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        z = self._logits(x)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1).to(x.dtype)

    def extra_repr(self) -> str:  # no scale: this map applies none
        return f"d={self.head_dim}, H={self.num_heads}, m={self.num_features}"


MAP_OPTIONS = ("scale", "stabiliser", "seed", "qmc", "radius", "learn_projection")


def build_feature_map(name: str, head_dim: int, num_heads: int, num_features: int | None = None,
                      **options) -> FeatureMap:
    """Build a registered feature map. num_features defaults to head_dim (2 head_dim for hedgehog).

    options: the maps' keyword options (MAP_OPTIONS: scale, stabiliser, seed, qmc, radius, learn_projection; see
    DiJiangFeatureMap for their meaning and defaults). learn_projection makes the projection P of an exp-type map a
    trained parameter (initialised as the map defines it); the elu map has no projection and refuses it;
    hedgehog always trains its map."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; registered: {sorted(FEATURE_MAPS)}")
    dims_are_ints = isinstance(head_dim, numbers.Integral) and isinstance(num_heads, numbers.Integral)
    if not dims_are_ints or head_dim < 1 or num_heads < 1:
        raise ValueError(f"head_dim and num_heads must be ints >= 1, got {head_dim!r} and {num_heads!r}")
    cls = FEATURE_MAPS[name]
    m = cls.default_num_features(int(head_dim)) if num_features is None else int(num_features)
    unknown = set(options) - set(MAP_OPTIONS)
    if unknown:
        raise ValueError(f"unknown feature map options {sorted(unknown)}; known: {list(MAP_OPTIONS)}")
    learn_projection = options.pop("learn_projection", False)
    if learn_projection and not cls.always_trained:
        if not issubclass(cls, ProjectedFeatureMap):
            raise ValueError(f"feature map {name!r} has no projection to learn (learn_projection=True)")
        options["learn_projection"] = True  # only the maps with a projection take this option
    return cls(int(head_dim), int(num_heads), m, **options)


# ---------------------------------------------------------------------------------------------
# Approximation error
# ---------------------------------------------------------------------------------------------


def approximation_error(feature_map: FeatureMap, q: Tensor, k: Tensor, scale: float | None = None) -> dict:
    """Errors of phi(Q) phi(K)^T against exp(scale Q K^T), per head, averaged over heads and batch.

    q, k: [..., T, H, d] (sequence-first, like the rest of the project). Returns floats:
      kernel_rel_err      relative Frobenius error after scaling every row of both matrices to unit L2
                          norm (removes per-query factors; per-key factors of a stabiliser still count)
      kernel_raw_rel_err  plain relative Frobenius error of the kernel (only meaningful for the
                          ``norm`` stabiliser; NaN otherwise)
      attn_rel_err        relative Frobenius error of the row-normalised matrix against softmax
      attn_tv             mean over rows of the total-variation distance between the two rows
    """
    scale = feature_map.scale if scale is None else float(scale)
    if q.shape[-1] != k.shape[-1] or q.shape[-2] != k.shape[-2] or q.dim() < 3:
        raise ValueError(f"q, k must be [..., T, H, d] with equal H, d; got {tuple(q.shape)} and {tuple(k.shape)}")
    with torch.no_grad():
        phi_q = feature_map(q).double().transpose(-3, -2)  # [..., H, Tq, m]
        phi_k = feature_map(k).double().transpose(-3, -2)
        kernel = phi_q @ phi_k.transpose(-1, -2)
        logits = scale * (q.double().transpose(-3, -2) @ k.double().transpose(-3, -2).transpose(-1, -2))
        exact = torch.exp(logits)
        attn_exact = torch.softmax(logits, dim=-1)
        attn = kernel / kernel.sum(-1, keepdim=True).clamp_min(1e-300)

        def unit_rows(a: Tensor) -> Tensor:
            return a / a.norm(dim=-1, keepdim=True).clamp_min(1e-300)

        def rel(a: Tensor, b: Tensor) -> Tensor:  # per-head relative Frobenius error
            return (a - b).norm(dim=(-2, -1)) / b.norm(dim=(-2, -1))

        out = {
            "kernel_rel_err": rel(unit_rows(kernel), unit_rows(exact)).mean().item(),
            "kernel_raw_rel_err": float("nan"),
            "attn_rel_err": rel(attn, attn_exact).mean().item(),
            "attn_tv": (0.5 * (attn - attn_exact).abs().sum(-1)).mean().item(),
        }
        if getattr(feature_map, "stabiliser", None) == "norm":
            out["kernel_raw_rel_err"] = rel(kernel, exact).mean().item()
    return out
