"""Text sources for training and evaluation: read sources, tokenise, pack into fixed-length blocks, split off a
held-out set. `dijiang.evaluate.load_text` reads its sources here too.

Sources (mixed freely):
  - a text file (any extension except .jsonl): one document;
  - a .jsonl file: one document per line, taken from field `text_field` ("text" by default);
  - a folder: every text file below it, recursively (hidden and binary files skipped);
    a folder written by `datasets.save_to_disk` is loaded as a dataset;
  - `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset (needs `datasets` and its cache or network);
  - `pydoc`: CPython's pydoc topics text (the default evaluation text, always available offline).
Offline default with no sources at all: text sampled from the teacher (`sample_teacher_text`).
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

DATASET_FOLDER_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")

# Varied on purpose: prose, code, dialogue, lists, reasoning, other languages.
TEACHER_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash table works, with a small Python example.",
    "What are the main causes of the French Revolution?",
    "Write a Python function that merges two sorted lists, then explain its complexity.",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a simple vegetable soup.",
    "Summarise the plot of a detective novel you invent.",
    "What is the difference between TCP and UDP?",
    "Write a polite email asking a colleague to review a document.",
    "Explain gradient descent and why the learning rate matters.",
    "List ten tips for staying productive when working from home.",
    "Write a dialogue between a customer and a bookshop owner.",
    "How do vaccines train the immune system?",
    "Write a bash script that counts lines in every .txt file of a folder.",
    "Explain the Pythagorean theorem and prove it.",
    "Describe a walk through a busy market in Marrakesh.",
    "What are the pros and cons of nuclear energy?",
    "Write a SQL query that finds the top five customers by total spending, and explain it.",
    "Translate 'The weather is lovely today, let us go for a walk' into French and Spanish.",
    "Explain what a black hole is.",
    "Write a haiku sequence about the four seasons.",
    "How does a bill become a law in the United States?",
    "Write a JavaScript function that debounces another function.",
    "Compare the economies of Japan and Germany.",
    "Describe how to change a flat tyre, step by step.",
    "What is photosynthesis? Include the chemical equation.",
    "Write a product description for a waterproof hiking backpack.",
    "Explain recursion with an example in C.",
    "What happened during the Apollo 11 mission?",
    "Give advice to a student preparing for a mathematics exam.",
    "Write a limerick about a forgetful robot.",
    "Explain the rules of chess briefly.",
]


def pydoc_topics_text() -> str:
    """CPython's pydoc topics (the language reference in prose), joined in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


# ---------------------------------------------------------------- reading sources


def read_documents(sources: list[str] | str, text_field: str = "text", *, hf_split: str | None = None,
                   hf_config: str | None = None) -> list[str]:
    """Documents (strings) from every source, in source order; empty documents dropped.

    hf_split, hf_config: the split and config of an hf: source that names none itself (no split: the "train"
    split of a dataset that has one, else every split)."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    documents: list[str] = []
    for source in sources:
        documents.extend(_read_source(str(source), text_field, (hf_split, hf_config)))
    return [doc for doc in documents if doc.strip()]


def _read_source(source: str, text_field: str, hub_defaults: tuple = (None, None)) -> list[str]:
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            if any((path / marker).exists() for marker in DATASET_FOLDER_MARKERS):
                return _read_dataset_folder(path, text_field)
            return _read_folder(path, text_field)
        try:
            return _read_file(path, text_field)
        except NotText as error:
            raise ValueError(f"data source {path}: {error}") from None
    if source == "pydoc":
        return [pydoc_topics_text()]
    if any(char in source for char in "*?["):
        matches = sorted(Path().glob(source) if not Path(source).is_absolute() else
                         Path(source).parent.glob(Path(source).name))
        if not matches:
            raise FileNotFoundError(f"data pattern {source!r} matches no file")
        return [doc for match in matches for doc in _read_source(str(match), text_field)]
    if source.startswith("hf:"):
        return _read_hub_dataset(source[3:], text_field, *hub_defaults)
    raise FileNotFoundError(
        f"data source {source!r} does not exist (expected a file, a folder, a glob pattern, 'pydoc', "
        "or hf:NAME for a Hugging Face dataset)"
    )


def _text_files(folder: Path) -> list[Path]:
    files = []
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append(file)
    return files


COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def _plain_name(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in COMPRESSED else path


class NotText(ValueError):
    """A file that is binary or not UTF-8."""


def _read_folder(folder: Path, text_field: str) -> list[str]:
    """Every text file under `folder`; binary and non-UTF-8 files are skipped, with one warning naming them."""
    documents, skipped = [], []
    for file in _text_files(folder):
        try:
            documents.extend(_read_file(file, text_field))
        except NotText:
            skipped.append(file.relative_to(folder).as_posix())
    if skipped:
        names = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(f"{folder}: skipped {len(skipped)} file(s) that are binary or not UTF-8 text: {names}",
                      stacklevel=3)
    return documents


def _read_file(path: Path, text_field: str) -> list[str]:
    if _plain_name(path).suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    raw = COMPRESSED[path.suffix](path).read() if path.suffix in COMPRESSED else path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise NotText("binary file (it holds NUL bytes)")
    try:
        return [raw.decode("utf-8")]
    except UnicodeDecodeError as error:
        raise NotText(f"not UTF-8 text ({error})") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
    opener = COMPRESSED.get(path.suffix)
    with (opener(path, "rt", encoding="utf-8") if opener else path.open(encoding="utf-8")) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{number}: expected an object with a {text_field!r} field")
            documents.append(str(record[text_field]))
    return documents


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("reading Hugging Face datasets needs the `datasets` package: pip install datasets") from None
    return datasets


def _texts_of(dataset, text_field: str, where: str) -> list[str]:
    if hasattr(dataset, "keys"):  # a DatasetDict: take "train" if present, else every split
        splits = ["train"] if "train" in dataset else sorted(dataset.keys())
        return [text for split in splits for text in _texts_of(dataset[split], text_field, where)]
    if text_field not in dataset.column_names:
        raise ValueError(f"{where}: no column {text_field!r} (columns: {dataset.column_names})")
    return [str(text) for text in dataset[text_field]]


def _read_dataset_folder(path: Path, text_field: str) -> list[str]:
    datasets = _import_datasets()
    return _texts_of(datasets.load_from_disk(str(path)), text_field, str(path))


def _read_hub_dataset(spec: str, text_field: str, split: str | None = None, config: str | None = None) -> list[str]:
    datasets = _import_datasets()
    name, _, spec_split = spec.partition("@")
    name, _, spec_config = name.partition(":")
    try:
        dataset = datasets.load_dataset(name, spec_config or config, split=spec_split or split)
    except Exception as error:  # offline, unknown name, missing config: say which source failed
        raise ValueError(f"could not load dataset hf:{spec} ({type(error).__name__}: {error})") from None
    return _texts_of(dataset, text_field, f"hf:{spec}")


# ---------------------------------------------------------------- teacher samples


@torch.no_grad()
def sample_teacher_text(
    model,
    tokenizer,
    n_tokens: int,
    prompts: list[str] | None = None,
    seed: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.8,
    progress: bool = False,
) -> list[str]:
    """About `n_tokens` tokens of text generated by `model` from varied prompts (no dataset needed).

    Each document is the prompt followed by the model's answer, as plain text. `progress`: a tqdm bar in tokens.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts or TEACHER_PROMPTS)
    order = random.Random(seed).sample(range(len(prompts)), len(prompts))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    documents: list[str] = []
    produced = 0
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    bar = tqdm(total=n_tokens, desc="sampling teacher text", unit="tok", disable=not progress, dynamic_ncols=True)
    try:
        batch_index = 0
        while produced < n_tokens:
            batch = [prompts[order[(batch_index * batch_size + i) % len(prompts)]] for i in range(batch_size)]
            batch_index += 1
            encoded = [_encode_prompt(tokenizer, prompt) for prompt in batch]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                max_new_tokens=min(max_new_tokens, max(8, -(-(n_tokens - produced) // batch_size))),
                pad_token_id=pad_id,
            )
            for prompt, answer_ids in zip(batch, output[:, width:].tolist()):
                answer_ids = [t for t in answer_ids if t != pad_id and t != tokenizer.eos_token_id]
                produced += len(answer_ids)
                bar.update(len(answer_ids))
                documents.append(prompt + "\n\n" + tokenizer.decode(answer_ids, skip_special_tokens=True))
    finally:
        bar.close()
        torch.random.set_rng_state(generator_state)
    return documents


def _encode_prompt(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- tokenise, split, pack


def tokenize_documents(documents: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document with EOS appended (so EOS separates documents once packed)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; packing needs one to separate documents")
    encoded = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(ids) + [eos] for ids in encoded]


def shuffle_documents(documents: list, seed: int) -> list:
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    return [documents[i] for i in order]


def split_held_out(
    token_documents: list[list[int]], held_out: float | int, block_size: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held_out) by whole documents, taken from the end of the (already shuffled) list.

    `held_out` < 1 is a fraction of all tokens, >= 1 a number of blocks.
    """
    if held_out <= 0:
        return token_documents, []
    total = sum(len(doc) for doc in token_documents)
    wanted = held_out * total if held_out < 1 else int(held_out) * block_size + 1
    held: list[list[int]] = []
    held_tokens = 0
    index = len(token_documents)
    while held_tokens < wanted and index > 1:  # always leave at least one training document
        index -= 1
        held.append(token_documents[index])
        held_tokens += len(token_documents[index])
    held.reverse()
    return token_documents[:index], held


def pack_blocks(token_documents: list[list[int]], block_size: int) -> torch.Tensor:
    """Concatenate the documents and cut the stream into `[N, block_size]`; the remainder is dropped."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    stream = [token for doc in token_documents for token in doc]
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


@dataclass
class PackedData:
    train: torch.Tensor  # [N, block_size] int64
    held_out: torch.Tensor  # [M, block_size] int64, M may be 0

    @property
    def block_size(self) -> int:
        return self.train.shape[1]


def build_blocks(
    documents: list[str],
    tokenizer,
    block_size: int,
    held_out: float | int = 0,
    seed: int = 0,
) -> PackedData:
    """Shuffle documents by `seed`, split off the held-out documents, tokenise and pack both parts."""
    if not documents:
        raise ValueError("no training text: every source was empty")
    token_documents = shuffle_documents(tokenize_documents(documents, tokenizer), seed)
    total = sum(len(doc) for doc in token_documents)
    if total < block_size:
        raise ValueError(f"only {total} tokens of text, fewer than one block of {block_size}")
    train_docs, held_docs = split_held_out(token_documents, held_out, block_size)
    train = pack_blocks(train_docs, block_size)
    if len(train) == 0:
        raise ValueError(
            f"no training block left after the held-out split ({total} tokens, block size {block_size}): "
            "give more text or a smaller held-out part"
        )
    return PackedData(train=train, held_out=pack_blocks(held_docs, block_size))


class BlockStream:
    """Blocks in a seeded order, reshuffled each epoch; `position` counts blocks served so far.

    Batch `i` of size `n` is a pure function of (seed, position), which is what makes resume exact.
    """

    def __init__(self, blocks: torch.Tensor, seed: int, position: int = 0):
        self.blocks = blocks
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._order: torch.Tensor | None = None

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(len(self.blocks), generator=generator), epoch
        return self._order

    def next_blocks(self, count: int) -> torch.Tensor:
        indices = []
        for position in range(self.position, self.position + count):
            epoch, offset = divmod(position, len(self.blocks))
            indices.append(self._order_of(epoch)[offset])
        self.position += count
        return self.blocks[torch.stack(indices)]


# ---------------------------------------------------------------- checks


PROBE_TEXT = "DiJiang probe: The quick brown fox, 12345 + 67890 = 80235; naïve café, 東京. def f(x): return x**2"


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """Distillation compares logits position by position: both sides must tokenise identically."""
    sizes = (len(teacher_tokenizer), len(student_tokenizer))
    if sizes[0] != sizes[1]:
        raise ValueError(f"tokenizer mismatch: teacher vocabulary has {sizes[0]} tokens, student {sizes[1]}")
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError("tokenizer mismatch: teacher and student vocabularies have the same size but other tokens")
    merges = [_merges_of(tok) for tok in (teacher_tokenizer, student_tokenizer)]
    if None not in merges and merges[0] != merges[1]:
        raise ValueError("tokenizer mismatch: teacher and student have the same vocabulary but other BPE merges")
    probe = [tok(PROBE_TEXT, add_special_tokens=False)["input_ids"] for tok in (teacher_tokenizer, student_tokenizer)]
    if probe[0] != probe[1]:
        raise ValueError("tokenizer mismatch: teacher and student encode the same probe text differently")


def _merges_of(tokenizer):
    """The BPE merge list of a fast tokenizer (None when it has none, or is a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.loads(backend.to_str()).get("model", {}).get("merges")


# ---------------------------------------------------------------- overlap with evaluation text

SHINGLE_WORDS = 13
_WORD = re.compile(r"\w+")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[int]:
    """Hashes of every n-word window of `text` (lowercased words), for near-duplicate tests."""
    words = words_of(text)
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def overlaps(text: str, eval_shingles: set[int], n: int = SHINGLE_WORDS) -> bool:
    """Whether `text` shares any n-word run with the text whose shingles are `eval_shingles`."""
    words = words_of(text)
    return any(hash(tuple(words[i : i + n])) in eval_shingles for i in range(len(words) - n + 1))
