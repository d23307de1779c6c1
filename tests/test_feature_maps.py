import io
import math

import numpy as np
import pytest
import scipy.fft
import scipy.stats
import torch

from dijiang.feature_maps import (
    FEATURE_MAPS,
    approximation_error,
    build_feature_map,
    dct_matrix,
    qmc_uniforms,
)

D, H = 16, 3
EXP_MAPS = ["dijiang", "pff", "performer", "official"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is several times faster than two fighting over 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def valid_num_features(name, d=D):
    return [d] if name in ("official", "elu") else [d, 2 * d]


def all_configs():
    for name in sorted(FEATURE_MAPS):
        for m in valid_num_features(name):
            for stab in ("softmax", "norm"):
                yield name, m, stab


def test_registry_has_all_maps():
    assert {"dijiang", "official", "performer", "pff", "elu", "hedgehog"} <= set(FEATURE_MAPS)


@pytest.mark.parametrize("name,m,stab", list(all_configs()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_dtype_finite(name, m, stab, dtype):
    fmap = build_feature_map(name, D, H, m, stabiliser=stab)
    assert (fmap.head_dim, fmap.num_heads, fmap.num_features) == (D, H, m)
    x = (3.0 * torch.randn(2, 5, H, D)).to(dtype)
    y = fmap(x)
    assert y.shape == (2, 5, H, m) and y.dtype == dtype
    assert torch.isfinite(y).all() and (y >= 0).all()
    assert fmap(x[0, 0]).shape == (H, m)  # no leading dims


def test_default_num_features_is_head_dim():
    assert build_feature_map("dijiang", D, H).num_features == D
    assert build_feature_map("hedgehog", D, H).num_features == 2 * D  # identity init: a half per sign


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_deterministic_by_seed(name):
    x = torch.randn(4, H, D)
    a = build_feature_map(name, D, H, seed=3)(x)
    b = build_feature_map(name, D, H, seed=3)(x)
    assert torch.equal(a, b)
    if name not in ("elu", "hedgehog"):  # elu has no randomness; hedgehog starts from the identity
        assert not torch.equal(a, build_feature_map(name, D, H, seed=4)(x))


def test_build_leaves_global_rng_alone():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    for name in FEATURE_MAPS:
        build_feature_map(name, D, H, seed=7)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state[1], np.random.get_state()[1])


@pytest.mark.parametrize("name", EXP_MAPS)
def test_state_dict_round_trip_bit_identical(name):
    src = build_feature_map(name, D, H, seed=1)
    if src.log_weight is not None:
        with torch.no_grad():
            src.log_weight.normal_()
    assert "projection" in src.state_dict()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = build_feature_map(name, D, H, seed=2)
    dst.load_state_dict(torch.load(buf))
    x = torch.randn(6, H, D)
    assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("name", ["dijiang", "official"])
def test_module_dtype_cast_keeps_projection_fp32(name):
    fmap = build_feature_map(name, D, H, seed=1)
    x = torch.randn(4, H, D)
    ref = fmap(x)
    fmap.to(torch.bfloat16)
    assert fmap.projection.dtype == torch.float32
    torch.testing.assert_close(fmap(x), ref)  # fp32 input, log_weight 0: bit-for-bit the same map
    assert fmap(x.bfloat16()).dtype == torch.bfloat16


# --- DCT and QMC construction ------------------------------------------------------------------


def test_dct_matrix_is_orthonormal_dct2():
    c = dct_matrix(D)
    np.testing.assert_allclose(c @ c.T, np.eye(D), atol=1e-12)
    x = np.random.default_rng(0).standard_normal(D)
    np.testing.assert_allclose(c @ x, scipy.fft.dct(x, type=2, norm="ortho"), atol=1e-12)
    n = np.arange(D)
    np.testing.assert_allclose(c[1], math.sqrt(2 / D) * np.cos(np.pi * (2 * n + 1) / (2 * D)), atol=1e-12)


@pytest.mark.parametrize("qmc", ["sobol", "halton"])
def test_dijiang_projection_is_dct_times_qmc_radii(qmc):
    seed, blocks = 5, 3
    fmap = build_feature_map("dijiang", D, H, blocks * D, seed=seed, qmc=qmc)
    engine = (scipy.stats.qmc.Sobol if qmc == "sobol" else scipy.stats.qmc.Halton)(
        d=blocks, scramble=True, seed=np.random.default_rng(seed)
    )
    radii = scipy.stats.norm.ppf(engine.random(D))  # [D, blocks]
    x = np.random.default_rng(1).standard_normal(D)
    projected = torch.from_numpy(x).float() @ fmap.projection  # sqrt(scale) aside: x @ P
    for b in range(blocks):
        expected = radii[:, b] * scipy.fft.dct(x, norm="ortho")
        np.testing.assert_allclose(projected[b * D : (b + 1) * D].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_qmc_uniforms_are_stratified_and_seeded():
    u = qmc_uniforms(64, 2, "sobol", seed=0)
    assert np.array_equal(u, qmc_uniforms(64, 2, "sobol", seed=0))
    assert not np.array_equal(u, qmc_uniforms(64, 2, "sobol", seed=1))
    for col in u.T:  # a scrambled Sobol net of 2^6 points has exactly one point per interval [i/64, (i+1)/64)
        assert sorted(np.floor(col * 64).astype(int)) == list(range(64))


def test_chi_radius_has_chi_magnitude():
    fmap = build_feature_map("pff", D, H, D, radius="chi", seed=2)
    norms = fmap.projection.norm(dim=0).numpy()  # orthonormal directions: column norm = |radius|
    u = qmc_uniforms(D, 1, "sobol", seed=2)[:, 0]
    np.testing.assert_allclose(norms, scipy.stats.chi.ppf(np.abs(2 * u - 1), D), rtol=1e-5)


# --- official -----------------------------------------------------------------------------------


def official_from_scratch(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The official repository's _build_projection + softmax(query @ proj), re-derived step by step."""
    d = x.shape[-1]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rand = torch.rand(d, d)
    icdf_w = torch.distributions.Normal(0, 1).icdf(torch.diag_embed(torch.diag(rand)))
    icdf_w = torch.where(torch.isinf(icdf_w), torch.full_like(icdf_w, 0), icdf_w)
    c = torch.from_numpy(scipy.fft.dct(np.eye(d, d), axis=0, norm="ortho")).type(torch.FloatTensor)
    proj = c @ icdf_w
    return torch.softmax(x @ proj, dim=-1)


@pytest.mark.parametrize("seed", [0, 123])
def test_official_matches_official_computation(seed):
    x = torch.randn(2, 7, H, D)
    ours = build_feature_map("official", D, H, scale=1.0, seed=seed)(x)
    torch.testing.assert_close(ours, official_from_scratch(x, seed), rtol=0, atol=1e-7)
    # with the default temperature, the official computation on sqrt(scale) x
    ours_scaled = build_feature_map("official", D, H, seed=seed)(x)
    torch.testing.assert_close(ours_scaled, official_from_scratch(x * D**-0.25, seed), rtol=1e-6, atol=1e-7)


# --- stabilisers and estimators ----------------------------------------------------------------


@pytest.mark.parametrize("name", EXP_MAPS)
def test_softmax_features_sum_to_one(name):
    y = build_feature_map(name, D, H, stabiliser="softmax")(5 * torch.randn(3, 4, H, D))
    torch.testing.assert_close(y.sum(-1), torch.ones(3, 4, H))


def mean_kernel_over_seeds(name, q, k, seeds, m, **kwargs):
    est = []
    for s in range(seeds):
        fmap = build_feature_map(name, q.shape[-1], 1, m, stabiliser="norm", seed=s, scale=1.0, **kwargs)
        est.append((fmap(q[None]) * fmap(k[None])).sum().item())
    est = torch.tensor(est, dtype=torch.float64)
    return est.mean().item(), est.std().item() / math.sqrt(seeds)


@pytest.mark.parametrize("name,kwargs", [("performer", {}), ("pff", {"radius": "chi"})])
def test_norm_stabiliser_is_unbiased(name, kwargs):
    d = 4
    gen = torch.Generator().manual_seed(0)
    q, k = 0.5 * torch.randn(d, generator=gen), 0.5 * torch.randn(d, generator=gen)
    exact = math.exp(q @ k)
    mean, stderr = mean_kernel_over_seeds(name, q, k, seeds=400, m=d, **kwargs)
    assert abs(mean - exact) < 4 * stderr + 1e-3, (mean, exact, stderr)


def test_paper_normal_radius_is_biased_towards_flat_kernel():
    """t = Phi^-1(u) along d orthonormal directions has second moment I/d: the estimate of exp(q.k) is
    far too small for aligned q, k (see module docstring)."""
    d = 8
    q = torch.full((d,), 0.5)
    exact = math.exp(q @ q)  # e^2
    mean, stderr = mean_kernel_over_seeds("pff", q, q, seeds=200, m=d)
    assert mean < 0.5 * exact and stderr < 0.05 * exact


def test_norm_stabiliser_guards_overflow():
    fmap = build_feature_map("performer", D, H, stabiliser="norm", scale=1.0)
    x = 50 * torch.randn(2, H, D)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = fmap(x.to(dtype))
        assert torch.isfinite(y).all()
        assert torch.isfinite((y.float()[0] * y.float()[1]).sum(-1)).all()


def test_gradients_reach_log_weight():
    fmap = build_feature_map("dijiang", D, H, 2 * D)
    assert fmap.log_weight.shape == (H, 2 * D) and torch.all(fmap.log_weight == 0)
    x = torch.randn(5, H, D)
    (fmap(x) * torch.randn(5, H, 2 * D)).sum().backward()
    assert fmap.log_weight.grad is not None and fmap.log_weight.grad.abs().sum() > 0
    assert not fmap.projection.requires_grad
    assert [n for n, _ in build_feature_map("pff", D, H).named_parameters()] == []


# --- hedgehog -----------------------------------------------------------------------------------


def hedgehog_with_random_weights(m=2 * D, seed=0):
    """A hedgehog map whose W is no longer the identity (as after training), per head different."""
    fmap = build_feature_map("hedgehog", D, H, m)
    with torch.no_grad():
        fmap.weight.normal_(generator=torch.Generator().manual_seed(seed))
    return fmap


def test_hedgehog_weights_are_per_head_identity_fp32_parameters():
    fmap = build_feature_map("hedgehog", D, H)
    assert [name for name, _ in fmap.named_parameters()] == ["weight"]
    assert fmap.weight.shape == (H, D, D) and fmap.weight.requires_grad
    assert torch.equal(fmap.weight, torch.eye(D).expand(H, D, D))
    fmap.to(torch.bfloat16)
    assert fmap.weight.dtype == torch.float32
    assert fmap(torch.randn(4, H, D, dtype=torch.bfloat16)).dtype == torch.bfloat16
    narrow = build_feature_map("hedgehog", D, H, D)  # m/2 < d: the rectangular identity, first m/2 coordinates
    assert torch.equal(narrow.weight[1], torch.eye(D, D // 2))


def test_hedgehog_identity_init_is_softmax_of_both_signs():
    x = 3.0 * torch.randn(2, 5, H, D)
    expected = torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)
    torch.testing.assert_close(build_feature_map("hedgehog", D, H)(x), expected, rtol=0, atol=1e-7)


def test_hedgehog_halves_are_positive_distributions_of_x_w():
    fmap = hedgehog_with_random_weights()
    x = torch.randn(3, 4, H, D)
    y = fmap(x)
    assert (y > 0).all()
    torch.testing.assert_close(y.unflatten(-1, (2, D)).sum(-1), torch.ones(3, 4, H, 2))
    z = torch.stack([x[..., h, :] @ fmap.weight[h] for h in range(H)], dim=-2)  # head h uses its own W_h
    torch.testing.assert_close(y[..., :D], torch.softmax(z, -1))
    torch.testing.assert_close(y[..., D:], torch.softmax(-z, -1))


def test_hedgehog_gradient_reaches_every_head_of_w():
    fmap = hedgehog_with_random_weights()
    x = torch.randn(5, H, D)
    (fmap(x) * torch.randn(5, H, 2 * D)).sum().backward()
    assert fmap.weight.grad.shape == (H, D, D)
    assert (fmap.weight.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_hedgehog_state_dict_round_trip_and_learn_projection_is_implied():
    src = hedgehog_with_random_weights(seed=3)
    dst = build_feature_map("hedgehog", D, H, learn_projection=True)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(6, H, D)
    assert torch.equal(src(x), dst(x))


# --- approximation_error ------------------------------------------------------------------------


def test_approximation_error_keys_and_exact_case():
    q = torch.zeros(2, 10, H, D)  # zero logits: uniform attention, which every softmax-map reproduces
    k = torch.randn(2, 12, H, D)
    err = approximation_error(build_feature_map("dijiang", D, H), q, k)
    assert set(err) == {"kernel_rel_err", "kernel_raw_rel_err", "attn_rel_err", "attn_tv"}
    assert math.isnan(err["kernel_raw_rel_err"])
    err_norm = approximation_error(build_feature_map("performer", D, H, stabiliser="norm"), q, k)
    assert math.isfinite(err_norm["kernel_raw_rel_err"])
    q = torch.randn(10, H, D)
    assert approximation_error(build_feature_map("dijiang", D, H), q, q)["attn_tv"] > 0


BENCH_D, BENCH_H, BENCH_T = 64, 4, 128  # benchmarks/approx_error.py setup, same data seeds


def bench_gauss(sigma, seed):
    gen = torch.Generator().manual_seed(seed)
    return (sigma * torch.randn(BENCH_T, BENCH_H, BENCH_D, generator=gen) for _ in range(2))


def bench_shared_low_rank(seed, param_seed=30_000):
    basis = torch.linalg.qr(torch.randn(BENCH_H, BENCH_D, 4, generator=torch.Generator().manual_seed(param_seed)))[0]
    gen = torch.Generator().manual_seed(seed)

    def one():
        coef = 1.5 * torch.randn(BENCH_T, BENCH_H, 4, generator=gen)
        return torch.einsum("hdr,thr->thd", basis, coef) + 0.3 * torch.randn(BENCH_T, BENCH_H, BENCH_D, generator=gen)

    return one(), one()


def bench_tv(name, q, k, m, seeds=(0, 1, 2), **kwargs):
    return np.mean(
        [
            approximation_error(build_feature_map(name, BENCH_D, BENCH_H, m, seed=s, **kwargs), q, k)["attn_tv"]
            for s in seeds
        ]
    )


def uniform_tv(q, k):
    attn = torch.softmax(torch.einsum("thd,shd->hts", q, k) * BENCH_D**-0.5, -1)
    return (0.5 * (attn - 1.0 / attn.shape[-1]).abs().sum(-1)).mean().item()


def test_pinned_orthogonal_qmc_beats_iid_monte_carlo():
    """docs/approximation.md, gauss s=0.25, m=d: performer 0.029, pff-chi 0.019 (and orf-chi 0.019)."""
    q, k = bench_gauss(0.25, 10_000)
    assert bench_tv("pff", q, k, 64, radius="chi") < 0.8 * bench_tv("performer", q, k, 64)


def test_pinned_paper_radii_track_uniform_attention():
    """docs/approximation.md: with t = Phi^-1(u) (paper, official) the attention stays within a few % of
    uniform attention at every m, while chi radii get close to half of it (shared low-rank, m=4d)."""
    q, k = bench_shared_low_rank(10_000)
    paper, uniform = bench_tv("dijiang", q, k, 256, seeds=(0,)), uniform_tv(q, k)
    assert abs(paper - uniform) < 0.05 * uniform
    assert bench_tv("official", q, k, 64, seeds=(0,)) > 0.95 * uniform
    assert bench_tv("dijiang", q, k, 256, seeds=(0,), radius="chi") < 0.7 * paper


def test_pinned_fitted_weights_help():
    """docs/approximation.md, shared low-rank, m=d, chi radii: unweighted 0.134, weighted 0.117."""
    q, k = bench_shared_low_rank(10_000)
    fmap = build_feature_map("dijiang", BENCH_D, BENCH_H, 64, radius="chi")
    before = approximation_error(fmap, q, k)["attn_tv"]
    opt = torch.optim.Adam([fmap.log_weight], lr=0.05)
    for step in range(40):
        qt, kt = bench_shared_low_rank(20_000 + step)  # fresh training draws, same head statistics
        kernel = torch.einsum("thm,shm->hts", fmap(qt), fmap(kt))
        log_attn = kernel.log() - kernel.sum(-1, keepdim=True).log()
        target = torch.softmax(torch.einsum("thd,shd->hts", qt, kt) * BENCH_D**-0.5, -1)
        loss = -(target * log_attn).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert approximation_error(fmap, q, k)["attn_tv"] < 0.95 * before


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="registered") as info:
        build_feature_map("nope", D, H)
    for name in FEATURE_MAPS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "args,kwargs",
    [
        (("dijiang", D, H, D + 1), {}),
        (("pff", D, H, 24), {}),
        (("official", D, H, 2 * D), {}),
        (("elu", D, H, 2 * D), {}),
        (("hedgehog", D, H), {"stabiliser": "relu"}),
        (("dijiang", 0, H), {}),
        (("performer", D, 0), {}),
        (("performer", D, H, 0), {}),
        (("dijiang", D, H), {"stabiliser": "relu"}),
        (("elu", D, H), {"stabiliser": "relu"}),
        (("dijiang", D, H), {"qmc": "lattice"}),
        (("dijiang", D, H), {"radius": "uniform"}),
        (("dijiang", D, H), {"scale": -1.0}),
    ],
)
def test_bad_construction_raises(args, kwargs):
    with pytest.raises(ValueError):
        build_feature_map(*args, **kwargs)


def test_odd_hedgehog_num_features_says_it_must_be_even():
    with pytest.raises(ValueError, match="even num_features"):
        build_feature_map("hedgehog", D, H, 2 * D + 1)


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_bad_input_shape_raises(name):
    fmap = build_feature_map(name, D, H)
    for bad in (torch.randn(4, H, D + 1), torch.randn(4, H + 1, D), torch.randn(D)):
        with pytest.raises(ValueError, match=r"\[\.\.\., H="):
            fmap(bad)
