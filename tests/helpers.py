"""Tiny offline models, tokenizers and text shared by the tests (a plain module: DDP workers and
tests/triton_interpret_cases.py import it too, so it is not a conftest).

Two model factories with different jobs: `tiny_model(family)` builds one of every supported architecture
at a fixed small vocabulary (conversion and decoding tests); `tiny_llama(vocab_size)` builds a Llama sized
to a trained tokenizer (data/train/eval tests). src/dijiang/bench.py keeps its own tiny model because the
installed package cannot import from tests/."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM

from dijiang.data import pydoc_topics_text

TESTS = Path(__file__).parent
REPO = TESTS.parent
EOS = "<eos>"
VOCAB = 97  # tiny_model's vocabulary
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt_neox", "gpt2", "opt"]  # tiny_model's


def corpus_text(start: int = 0, length: int = 20_000) -> str:
    return pydoc_topics_text()[start : start + length]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 320, text_start: int = 0) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on a slice of the pydoc text; deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus_text(text_start, 30_000)
    tokenizer.train_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, tie_embeddings: bool = False) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=0, pad_token_id=0, bos_token_id=0, initializer_range=0.2, tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def save_tiny_model(folder: Path, seed: int = 0, tokenizer=None, tie_embeddings: bool = False) -> Path:
    """A tiny random Llama plus tokenizer, saved like a hub checkpoint (load_pretrained reads it)."""
    tokenizer = tokenizer or tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed, tie_embeddings=tie_embeddings)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text_corpus(folder: Path, n_files: int = 6, chars: int = 3000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = corpus_text(0, n_files * chars)
    for i in range(n_files):
        (folder / f"doc{i}.txt").write_text(text[i * chars : (i + 1) * chars])
    return folder


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                        "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
        config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                              tie_word_embeddings=False, **common)
        if family == "qwen2":
            config.attention_bias = True
    elif family == "gemma3_text":  # sliding-window and global layers, q/k norms, query_pre_attn_scalar
        config = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                               max_position_embeddings=512, sliding_window=8, **common)
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                            num_attention_heads=4, max_position_embeddings=512,
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "partial_rotary_factor": 0.25}, **common)
    elif family == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=512, **common)
    elif family == "opt":
        config = transformers.OPTConfig(hidden_size=64, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
                                        word_embed_proj_dim=64, max_position_embeddings=512, **common)
    else:
        raise KeyError(family)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model


def left_padded(lengths=(7, 4), seed=0):
    """Random token rows of the given lengths, left-padded with 0 to one width; returns (ids, mask)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def reference(model, ids, mask, new, **kwargs):
    """model.generate's greedy tokens: what the fast decoder must reproduce."""
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              pad_token_id=0, **kwargs)


def read_log(out) -> list[dict]:
    """The records of a training run's log.jsonl."""
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def worker_env():
    """Environment for subprocess workers (torchrun, kill tests): src/ and tests/ importable, one thread."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def assert_refused_in_every_mode(op, base: dict, overrides: dict, message: str, modes) -> None:
    """op(**base, **overrides) raises a ValueError matching `message` in each of `modes` (in the one mode the
    overrides name, when they name one)."""
    import pytest

    kwargs = {**base, **overrides}
    for mode in modes:
        if "mode" not in overrides:
            kwargs["mode"] = mode
        with pytest.raises(ValueError, match=message):
            op(**kwargs)


def token_decays(batch=2, seq_len=9, heads=3, seed=5):
    """A per-token log decay [B, T, H] (a data-dependent gate's output), between log 0.5 and log 0.99."""
    gen = torch.Generator().manual_seed(seed)
    return torch.log(0.5 + 0.49 * torch.rand(batch, seq_len, heads, generator=gen))
