"""Tiny offline models, tokenizers and text for the data/train tests (a plain module: workers import it too)."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dijiang.data import pydoc_topics_text

EOS = "<eos>"


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
