"""Long checks for `make test-slow` (minutes on 2 cores): full-length stability, the real model at length,
and a real fine-tune that must lower the converted model's perplexity."""
import copy
import math

import pytest
import torch

import dijiang
from dijiang.hf_compat import cache_keyword, output_cache
from dijiang.ops import chunk_linear_attention, window_attention

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_op_is_stable_at_65k_tokens(dtype):
    seq_len, heads = 65_536, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v, qf, kf = (torch.randn(1, seq_len, heads, 16, generator=gen).to(dtype).requires_grad_(True)
                       for _ in range(5))
    log_decay = torch.log(1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), heads)))
    log_decay.requires_grad_(True)
    lin_weight = torch.ones(heads, requires_grad=True)
    o, state = window_attention(q, k, v, qf.abs(), kf.abs(), log_decay, lin_weight, window=64,
                                output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(state["S"]).all()
    o.float().sum().backward()
    for x in (q, k, v, qf, kf, log_decay, lin_weight):
        assert torch.isfinite(x.grad).all()


def test_chunk_op_at_262k_tokens_matches_split_calls():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.rand(1, 262_144, 2, 16, generator=gen) for _ in range(2))
    v = torch.randn(1, 262_144, 2, 16, generator=gen)
    log_decay = torch.log(torch.tensor([1 - 1 / 32, 1 - 1 / 512]))
    whole, state = chunk_linear_attention(q, k, v, log_decay, output_final_state=True, normalize=True)
    half = 131_072
    first, mid = chunk_linear_attention(q[:, :half], k[:, :half], v[:, :half], log_decay,
                                        output_final_state=True, normalize=True)
    second, end = chunk_linear_attention(q[:, half:], k[:, half:], v[:, half:], log_decay, initial_state=mid,
                                         output_final_state=True, normalize=True)
    assert torch.isfinite(whole).all()
    assert torch.allclose(torch.cat([first, second], 1), whole, rtol=1e-4, atol=1e-5)
    assert torch.allclose(end, state, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    return dijiang.load_pretrained("smollm2")


@pytest.mark.parametrize("settings", [{}, {"window": 64}], ids=["pure", "window64"])
def test_real_smollm2_decode_equals_prefill_at_length(smollm2, settings):
    teacher, tokenizer = smollm2
    from pydoc_data.topics import topics

    student = dijiang.convert(copy.deepcopy(teacher), settings).eval()
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[:8000], return_tensors="pt").input_ids[:, :700]
    with torch.no_grad():
        full = student(ids, use_cache=False).logits[:, 600:]
        out = student(ids[:, :600], use_cache=True)
        cache, steps, keyword = output_cache(out), [], cache_keyword(student.forward)
        for t in range(600, 700):
            out = student(ids[:, t:t + 1], use_cache=True, **{keyword: cache})
            cache = output_cache(out)
            steps.append(out.logits)
    stepped = torch.cat(steps, 1)
    assert ((stepped - full).norm() / full.norm()).item() < 1e-4


def test_real_fine_tune_lowers_perplexity(smollm2, tmp_path):
    from dijiang.evaluate import perplexity, pydoc_topics_text
    from dijiang.train import TrainConfig, train

    teacher, tokenizer = smollm2
    folder = tmp_path / "teacher"
    dijiang.conversion.save_converted(teacher, tokenizer, folder)
    text = pydoc_topics_text()
    train_file = tmp_path / "train.txt"
    from dijiang.demo import stdlib_training_text

    train_file.write_text(stdlib_training_text(200_000))
    before = dijiang.convert(copy.deepcopy(teacher), {"window": 64})
    ppl_before = perplexity(before, tokenizer, text, window=256, max_windows=4).perplexity
    config = TrainConfig(model=str(folder), out=str(tmp_path / "run"), data=[str(train_file)], eval_data=[],
                         tokens="12K", block_size=256, batch_size=4, attention={"window": 64}, save_every=0,
                         progress=False, mixed_precision="no")
    student = train(config)["model"]
    ppl_after = perplexity(student, tokenizer, text, window=256, max_windows=4).perplexity
    assert ppl_after < ppl_before
