"""The training run's data: packed training blocks (cached under $DIJIANG_CACHE/blocks), text sampled from the
teacher when no data is given (cached in the run folder), the evaluation sets, and the batch stream every rank
draws from."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from dijiang import data as data_lib
from dijiang.arguments import parse_token_count
from dijiang.checkpoints import TEACHER_TEXT_FILE
from dijiang.files import write_text_atomic as _write_atomic
from dijiang.retrieval_data import retrieval_documents
from dijiang.train_config import DEFAULT_TEACHER_TOKENS, TrainConfig


# ---------------------------------------------------------------- data

RETRIEVAL_CHARS_PER_TOKEN = 3  # English text is ~4 characters a token: a synthetic document fills most of one block


def prepare_data(config: TrainConfig, teacher, tokenizer, accelerator, out: Path):
    teacher_tokens = parse_token_count(config.teacher_text_tokens) or (0 if config.data else DEFAULT_TEACHER_TOKENS)
    cache = None if teacher_tokens or not config.data_cache else blocks_cache_file(config, tokenizer)
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        packed = data_lib.PackedData(train=saved["train"], held_out=saved["held_out"])
    else:
        documents = data_lib.read_documents(config.data, config.text_field) if config.data else []
        if teacher_tokens:
            documents += _teacher_text(teacher, tokenizer, teacher_tokens, config.seed, accelerator, out,
                                       config.progress)
        if config.retrieval_documents:
            documents += retrieval_documents(documents, config.retrieval_documents, RETRIEVAL_CHARS_PER_TOKEN
                                             * config.block_size, config.seed)
        packed = data_lib.build_blocks(documents, tokenizer, config.block_size, config.held_out, config.seed)
        if cache is not None and accelerator.is_main_process:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f".{cache.name}.{os.getpid()}")
            torch.save({"train": packed.train, "held_out": packed.held_out}, partial)
            partial.replace(cache)
    eval_sets = {}
    if len(packed.held_out):
        eval_sets["held_out"] = packed.held_out[: config.eval_blocks]
    for source in config.eval_data or []:
        eval_sets[Path(source).name or source] = load_eval_blocks(
            source, tokenizer, config.block_size, config.eval_blocks, config.text_field)
    return packed, eval_sets


def load_eval_blocks(source: str, tokenizer, block_size: int, count: int, text_field: str = "text") -> torch.Tensor:
    """The first ``count`` packed blocks of one evaluation source: the loop's periodic evaluation set."""
    documents = data_lib.read_documents([source], text_field)
    blocks = data_lib.pack_blocks(data_lib.tokenize_documents(documents, tokenizer), block_size)
    if not len(blocks):
        raise ValueError(f"evaluation source {source!r} holds less than one block of {block_size} tokens")
    return blocks[:count]


def blocks_cache_file(config: TrainConfig, tokenizer) -> Path:
    """Where the packed blocks of these sources, tokenizer and packing options are cached (tokenising a large
    corpus takes longer than a short fine-tune). Files are identified by path, size and modification time."""
    from dijiang.settings import cache_dir

    sources = []
    for source in config.data:
        path = Path(source)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        sources.append([source, [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
    key = json.dumps([sources, config.text_field, type(tokenizer).__name__, len(tokenizer),
                      tokenizer(data_lib.PROBE_TEXT)["input_ids"],
                      config.block_size, config.held_out, config.seed, config.retrieval_documents])
    return cache_dir() / "blocks" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def _teacher_text(teacher, tokenizer, n_tokens: int, seed: int, accelerator, out: Path, progress: bool) -> list[str]:
    """Sampled once by the main process and cached in `out`, so that every rank and every resume see the same text."""
    cache = out / TEACHER_TEXT_FILE
    key = {"tokens": n_tokens, "seed": seed}
    with accelerator.main_process_first():
        if accelerator.is_main_process and _cached_key(cache) != key:
            print(f"sampling {n_tokens} tokens of training text from the teacher (no --data given) ...",
                  file=sys.stderr)
            documents = data_lib.sample_teacher_text(teacher, tokenizer, n_tokens, seed=seed, progress=progress)
            lines = [json.dumps(key)] + [json.dumps({"text": doc}) for doc in documents]
            _write_atomic(cache, "\n".join(lines) + "\n")
    from dijiang.files import read_jsonl

    return [record["text"] for record in read_jsonl(cache)[1:]]


def _cached_key(path: Path):
    if not path.exists():
        return None
    with path.open(encoding="utf-8") as lines:
        try:
            return json.loads(lines.readline() or "null")
        except json.JSONDecodeError:  # unreadable cache: sample again
            return None


def data_fingerprint(blocks: torch.Tensor) -> str:
    weights = torch.arange(1, blocks.shape[1] + 1, dtype=torch.long)
    return f"{tuple(blocks.shape)}:{int((blocks * weights).sum())}"


class Batches:
    """Each micro-step takes one global batch (batch_size x processes) from the stream; this rank keeps its slice."""

    def __init__(self, blocks: torch.Tensor, config: TrainConfig, rank: int, world: int, position: int = 0):
        self.stream = data_lib.BlockStream(blocks, config.seed, position)
        self.batch_size, self.rank, self.world = config.batch_size, rank, world

    def next(self, device) -> torch.Tensor:
        global_batch = self.stream.next_blocks(self.batch_size * self.world)
        return global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].to(device)
