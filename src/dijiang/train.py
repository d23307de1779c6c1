"""Fine-tune a converted model against its frozen softmax teacher.

Stage 1 (optional, `attention_transfer_tokens`): only the parameters DiJiang added train, each converted
attention module learning to reproduce its teacher module's output on the teacher's own inputs.
Stage 2: end to end, KD (KL to the teacher's logits) + LM loss, full fine-tuning or LoRA.

One process on CPU, or several under `accelerate launch`: DDP, or FSDP2 (both stages; `dijiang.distributed`
holds what sharding changes). Checkpoints hold
everything needed to continue bit for bit after a kill: trainable weights (safetensors), optimizer state,
RNG states of every rank, and the data position (batches are a pure function of seed and position).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dijiang import data as data_lib
from dijiang import distributed
from dijiang.arguments import (fraction, non_negative_float, non_negative_int, parse_bool, parse_token_count,  # noqa: F401
                               positive_float, positive_int)  # parse_token_count: also dijiang.train.parse_token_count
from dijiang.attention import DiJiangSettings, gate_summary
from dijiang.capture import first_tensor, module_io
from dijiang.conversion import iter_dijiang_layers
from dijiang.files import write_text_atomic as _write_atomic
from dijiang.losses import attention_transfer_loss, distillation_loss, lm_loss

DEFAULT_TEACHER_TOKENS = 100_000  # sampled from the teacher when no data source is given
CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"
TEACHER_TEXT_FILE = "teacher_text.jsonl"


# ---------------------------------------------------------------- configuration


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    model: str = field(default="smollm2", metadata=_help("embedded name (smollm2), local dir or hub name"))
    teacher: str | None = field(default=None, metadata=_help("teacher model (default: the unconverted model)", type=str))
    out: str = field(default="runs/train", metadata=_help("output folder: log, checkpoints, final model"))
    data: list = field(default_factory=list, metadata=_help("text sources: files, folders, .jsonl, hf:NAME, pydoc"))
    text_field: str = field(default="text", metadata=_help("field of .jsonl / dataset records holding the text"))
    teacher_text_tokens: str = field(
        default="0", metadata=_help(f"tokens to sample from the teacher as training text (default {DEFAULT_TEACHER_TOKENS} when no --data)")
    )
    eval_data: list = field(default_factory=lambda: ["pydoc"], metadata=_help("evaluation text sources"))
    eval_blocks: int = field(default=16, metadata=_help("blocks per evaluation set", check=positive_int))
    eval_every: int = field(default=0, metadata=_help("evaluate every N steps (0: only at the end)", check=non_negative_int))
    held_out: float = field(default=0.0, metadata=_help("held-out part of the training text: fraction (<1) or blocks",
                                                        check=non_negative_float))
    tokens: str = field(default="20M", metadata=_help(
        "stage-2 token budget (K/M/G suffixes); SmolLM2 with its teacher trains at ~20K tokens/s on an H100 "
        "(20M: 17 minutes), ~20-150 tokens/s on a CPU"))
    attention_transfer_tokens: str = field(default="0", metadata=_help("stage-1 (attention transfer) token budget"))
    attention_transfer_lr: float | None = field(default=None, metadata=_help(
        "peak learning rate of stage 1, which trains only the new parameters (default: --new-lr)",
        type=float, check=positive_float))
    block_size: int = field(default=512, metadata=_help("tokens per training sequence", check=positive_int))
    batch_size: int = field(default=8, metadata=_help("sequences per micro-batch per process", check=positive_int))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step", check=positive_int))
    lr: float = field(default=1e-4, metadata=_help("peak learning rate of pretrained weights", check=non_negative_float))
    new_lr: float = field(default=1e-3, metadata=_help("peak learning rate of the parameters DiJiang added",
                                                       check=non_negative_float))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW weight decay (matrices only)", check=non_negative_float))
    beta1: float = field(default=0.9, metadata=_help("AdamW beta1", check=fraction))
    beta2: float = field(default=0.95, metadata=_help("AdamW beta2", check=fraction))
    warmup: float = field(default=0.05, metadata=_help("warm-up: fraction of the steps (<1) or a number of steps",
                                                       check=non_negative_float))
    min_lr_ratio: float = field(default=0.1, metadata=_help("final learning rate as a fraction of the peak", check=fraction))
    grad_clip: float = field(default=1.0, metadata=_help("clip the gradient norm (0: off)", check=non_negative_float))
    kd_weight: float = field(default=1.0, metadata=_help("weight of KL(teacher || student)", check=non_negative_float))
    lm_weight: float = field(default=0.2, metadata=_help("weight of the next-token cross-entropy", check=non_negative_float))
    temperature: float = field(default=1.0, metadata=_help("distillation temperature", check=positive_float))
    lora_rank: int = field(default=0, metadata=_help("LoRA rank (0: full fine-tuning)", check=non_negative_int))
    lora_alpha: float = field(default=32.0, metadata=_help("LoRA scale numerator (the update is scaled by alpha/rank)",
                                                          check=positive_float))
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                               metadata=_help("module names LoRA adapts"))
    attention: dict = field(default_factory=dict, metadata=_help("DiJiang settings, KEY=VALUE (window=64 ...)"))
    layers: list | None = field(default=None, metadata=_help("layer indices to convert (default all)",
                                                             type=non_negative_int))
    gradient_checkpointing: bool = field(default=False,
                                         metadata=_help("recompute activations in the backward pass (less memory)"))
    mixed_precision: str = field(default="auto", metadata=_help("auto (bf16 on CUDA), bf16, fp16 or no"))
    save_every: int = field(default=500, metadata=_help("checkpoint every N steps (0: never)", check=non_negative_int))
    keep_checkpoints: int = field(default=2, metadata=_help("checkpoints kept (0: all)", check=non_negative_int))
    max_steps: int | None = field(default=None, metadata=_help("stop after N steps (the schedule keeps its length)",
                                                               check=positive_int))
    seed: int = field(default=0, metadata=_help("seed of the initialisation, the data order and the teacher sample",
                                                   check=non_negative_int))
    data_cache: bool = field(default=True, metadata=_help("cache the packed training blocks under $DIJIANG_CACHE/blocks"))
    resume: bool = field(default=False, metadata=_help("continue from the last checkpoint in --out"))
    overwrite: bool = field(default=False, metadata=_help("replace an earlier run's files in --out (else an error)"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        normalised = {str(key).replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**normalised)

    def validated(self) -> "TrainConfig":
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if "check" in spec.metadata and value is not None:
                setattr(self, spec.name, spec.metadata["check"].check(spec.name, value))
            elif isinstance(spec.default, bool):  # a recipe's quoted "no" must not read as true
                setattr(self, spec.name, parse_bool(spec.name, value))
        if self.layers is not None:
            self.layers = [non_negative_int.check("layers entry", i) for i in self.layers]
        if self.attention:  # before any model is loaded: a bad setting fails in a second, not after minutes
            DiJiangSettings.from_any(dict(self.attention))
        if self.kd_weight + self.lm_weight == 0:
            raise ValueError("kd_weight and lm_weight must not both be 0")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
        for name in ("tokens", "attention_transfer_tokens", "teacher_text_tokens"):
            parse_token_count(getattr(self, name))
        if parse_token_count(self.tokens) < self.block_size:
            raise ValueError(f"token budget {self.tokens} is smaller than one block ({self.block_size} tokens)")
        return self


# ---------------------------------------------------------------- schedule


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine down to `min_ratio` at the last step.

    `step` is the 0-based index of the update about to be taken.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps_of(warmup: float, total_steps: int) -> int:
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


# ---------------------------------------------------------------- model preparation


def new_parameter_ids(model) -> set[int]:
    return {id(p) for _, module in iter_dijiang_layers(model) for p in module.new_parameters()}


def unwrapped_from_peft(model):
    """The transformers model inside a peft wrapper (whose module paths carry a base_model.model. prefix)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_model(name: str, dtype=torch.float32):
    from dijiang.loading import load_pretrained

    return load_pretrained(name, dtype=dtype)


def build_student(model, config: TrainConfig, convert_fn: Callable | None):
    """Convert in place, then choose what trains: everything, or LoRA adapters + the new parameters."""
    if convert_fn is None:
        from dijiang.conversion import convert as convert_fn
    student = convert_fn(model, config.attention or None, config.layers)
    if next(iter_dijiang_layers(student), None) is None:
        raise ValueError("the conversion produced no DiJiang layers (no module with new_parameters())")
    student.config.use_cache = False
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=list(config.lora_targets), bias="none")
        student = get_peft_model(student, lora)
    else:
        student.requires_grad_(True)
    for _, module in iter_dijiang_layers(student):
        for parameter in module.new_parameters():
            parameter.requires_grad_(True)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student


def freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def build_optimizer(named_parameters, new_ids: set[int], config: TrainConfig,
                    new_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with four groups: {pretrained, new} x {matrices (decayed), vectors (not)}; each keeps its peak lr
    (new_lr, when given, replaces config.new_lr)."""
    new_lr = config.new_lr if new_lr is None else new_lr
    groups = {}
    for _, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        is_new = id(parameter) in new_ids
        key = ("new" if is_new else "pretrained", parameter.ndim >= 2)
        if key not in groups:
            peak = new_lr if is_new else config.lr
            groups[key] = {"params": [], "weight_decay": config.weight_decay if key[1] else 0.0,
                           "peak_lr": peak, "lr": peak, "name": f"{key[0]}_{'matrix' if key[1] else 'vector'}"}
        groups[key]["params"].append(parameter)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    return torch.optim.AdamW(list(groups.values()), betas=(config.beta1, config.beta2))


def set_lr(optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * multiplier


# ---------------------------------------------------------------- data


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
                      config.block_size, config.held_out, config.seed])
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


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINT_DIR
    return sorted(root.glob("step_*")) if root.exists() else []


def trainable_state(model, names: list[str]) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    return {name: parameters[name].detach().cpu().contiguous().clone() for name in names}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model, names: list[str], optimizer, progress: dict, accelerator, keep: int):
    """Write into a hidden folder, then rename it: a folder named step_* is always complete."""
    from safetensors.torch import save_file

    root = out / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    weights, optimizer_state = _state_to_save(model, names, optimizer, accelerator)
    if accelerator.is_main_process:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**progress, "step": step}, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _state_to_save(model, names: list[str], optimizer, accelerator) -> tuple[dict | None, dict | None]:
    """(trained weights, optimizer state) for rank 0 to write: gathered by every rank when sharded (collectives),
    read by rank 0 alone otherwise."""
    if distributed.is_sharded(accelerator):
        return distributed.full_trainable_state(model, names, accelerator), distributed.full_optimizer_state(model, optimizer)
    if accelerator.is_main_process:
        return trainable_state(model, names), optimizer.state_dict()
    return None, None


def _read_trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return _read_checkpoint_file(folder / "trainable.safetensors", lambda f: load_file(str(f)))


def _apply_trained_weights(folder: Path, model, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    if sorted(tensors) != sorted(names):
        raise ValueError(
            f"checkpoint {folder} holds different parameters than this run trains "
            "(was it written with other --lora-rank / --layers / --attention settings?)"
        )
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def load_trained_weights(folder: Path, model, names: list[str]) -> None:
    _apply_trained_weights(folder, model, names, _read_trained_weights(folder))


def load_checkpoint(folder: Path, model, names: list[str], accelerator) -> tuple[dict, dict]:
    """Load weights into `model` and restore this rank's RNG; returns (progress, optimizer state).

    Every file is read before anything is applied: an unreadable one raises CorruptCheckpoint naming it and
    leaves the model and the RNG as they were.
    """
    rng_file = folder / f"rng_rank{accelerator.process_index}.pt"
    if not rng_file.exists():
        raise ValueError(f"{folder} was written by fewer processes; resume with the same number of processes")
    tensors = _read_trained_weights(folder)
    rng = _read_checkpoint_file(rng_file, lambda f: torch.load(f, weights_only=True))
    optimizer_state = _read_checkpoint_file(folder / "optimizer.pt",
                                            lambda f: torch.load(f, weights_only=True, map_location="cpu"))
    progress = _read_checkpoint_file(folder / "state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
    _apply_trained_weights(folder, model, names, tensors)
    set_rng_state(rng)
    return progress, optimizer_state


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, overwritten, bad JSON)."""


def _read_checkpoint_file(path: Path, read: Callable):
    try:
        return read(path)
    except Exception as error:  # safetensors, torch.load and json each raise their own kinds
        raise CorruptCheckpoint(f"checkpoint file {path} cannot be read ({type(error).__name__}: {error})") from None


def load_newest_checkpoint(out: Path, model, names: list[str], accelerator) -> tuple[Path, dict, dict]:
    """The newest checkpoint that reads back; a corrupt newer one is skipped with a warning."""
    folders = checkpoint_dirs(out)
    for folder in reversed(folders):
        try:
            return (folder, *load_checkpoint(folder, model, names, accelerator))
        except CorruptCheckpoint as error:
            if folder == folders[0]:
                raise
            print(f"warning: {error}; falling back to the checkpoint before it", file=sys.stderr)
    raise AssertionError("unreachable: checkpoint_dirs was not empty")


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines of steps after the checkpoint: they are run again (and a line torn by a kill)."""
    from dijiang.files import read_jsonl

    if not path.exists():
        return
    kept = [record for record in read_jsonl(path, torn_last_line_ok=True) if record.get("step", 0) <= last_step]
    _write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


# ---------------------------------------------------------------- output folder

# what a run writes into --out (anything else there is the user's and stays)
RUN_FILES = (CHECKPOINT_DIR, LOG_FILE, TEACHER_TEXT_FILE, "summary.json", "final")


def check_out_dir(out: Path, config: TrainConfig) -> list[str]:
    """The earlier run's files in `out`; ValueError when this run would replace them without being asked,
    or when --resume finds nothing to resume (a mistyped --out must not start from scratch)."""
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if config.resume:
        if not out.is_dir():
            raise FileNotFoundError(f"--resume: {out} does not exist, nothing to resume (is --out right?)")
        finished = {"final", "summary.json"} & set(earlier)
        if not checkpoint_dirs(out) and (finished or not earlier):
            what = f"a finished run ({', '.join(sorted(finished))}) without checkpoints" if finished else "no run"
            raise ValueError(f"--resume: {out} holds {what}; nothing to resume (pass --overwrite without --resume "
                             "to start over there)")
        return earlier
    if earlier and not config.overwrite:
        raise ValueError(f"{out} already holds an earlier run ({', '.join(earlier)}): pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    return earlier


def remove_run_files(out: Path, names: list[str]) -> None:
    for name in names:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ---------------------------------------------------------------- steps


def attention_transfer_step(student, teacher, paths: list[str], input_ids: torch.Tensor, accelerator) -> torch.Tensor:
    """Run the teacher, capture each attention module's inputs and output, run the student module on the same inputs
    (directly, or inside the student's forward when it is sharded)."""
    with module_io(teacher, paths) as records, torch.no_grad(), accelerator.autocast():
        teacher(input_ids=input_ids, use_cache=False)
    captured_inputs = {path: (records[path]["args"], records[path]["kwargs"]) for path in paths}
    student_outputs = []
    with accelerator.autocast():
        if distributed.is_sharded(accelerator):
            modules = [unwrapped_from_peft(student).get_submodule(path) for path in paths]
            student_outputs = distributed.attention_outputs_on_inputs(student, input_ids, modules,
                                                                      [captured_inputs[p] for p in paths])
        else:
            for path in paths:
                args, kwargs = captured_inputs[path]
                output = unwrapped_from_peft(student).get_submodule(path)(*args, **kwargs)
                student_outputs.append(first_tensor(output))
    return attention_transfer_loss(student_outputs, [records[p]["output"] for p in paths])


def distillation_step(student, teacher, input_ids: torch.Tensor, config: TrainConfig, accelerator) -> dict:
    teacher_logits = None
    if config.kd_weight:
        with torch.no_grad(), accelerator.autocast():
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
    with accelerator.autocast():
        student_logits = student(input_ids=input_ids, use_cache=False).logits
    return distillation_loss(student_logits, teacher_logits, input_ids, config.kd_weight, config.lm_weight, config.temperature)


@torch.no_grad()
def evaluate_loss(model, blocks: torch.Tensor, batch_size: int, accelerator, progress: bool = False,
                  desc: str = "eval") -> float:
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, unit="batch", disable=not progress, leave=False,
                      dynamic_ncols=True):
        batch = blocks[start : start + batch_size].to(accelerator.device)
        with accelerator.autocast():
            logits = model(input_ids=batch, use_cache=False).logits
        total += lm_loss(logits, batch).item() * len(batch)
        count += len(batch)
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------- the loop


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator

    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if distributed.fsdp_requested():
        return distributed.fsdp_accelerator(precision)
    # cpu=True is what makes accelerate see a torchrun launch on a CPU-only machine as multi-process (gloo)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def train(config: TrainConfig, convert_fn: Callable | None = None, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run both stages; returns a summary (steps, tokens, last losses, evaluation losses, paths, the model).

    convert_fn(model, settings, layers) -> model replaces `dijiang.convert` (tests inject tiny variants);
    on_step(step, record) is called after each logged step (tests use it to kill the process mid-run).
    """
    config = config.validated()
    accelerator = _accelerator(config)
    if accelerator.distributed_type.name == "DEEPSPEED":
        raise ValueError("dijiang train does not support DeepSpeed; launch with FSDP "
                         "(accelerate launch --config_file configs/accelerate_fsdp.yaml) or DDP (--multi_gpu)")
    sharded = distributed.is_sharded(accelerator)
    out = Path(config.out)
    earlier_run = check_out_dir(out, config)  # every rank: an error must stop them all
    if accelerator.is_main_process:
        if config.overwrite and not config.resume:
            remove_run_files(out, earlier_run)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, tokenizer = load_model(config.model)
    if config.teacher:
        teacher, teacher_tokenizer = load_model(config.teacher)
        data_lib.check_same_tokenizer(teacher_tokenizer, tokenizer)
    else:
        teacher = copy.deepcopy(model)
    # sharded: both stay on the CPU until fully_shard moves each unit's shard to the device
    device = "cpu" if sharded else accelerator.device
    teacher = freeze(teacher).to(device)
    student = build_student(model, config, convert_fn).to(device)
    student.train()

    packed, eval_sets = prepare_data(config, teacher, tokenizer, accelerator, out)
    world = accelerator.num_processes
    tokens_per_step = config.block_size * config.batch_size * config.grad_accum * world
    stage_steps = [
        math.ceil(parse_token_count(config.attention_transfer_tokens) / tokens_per_step),
        math.ceil(parse_token_count(config.tokens) / tokens_per_step),
    ]
    total_steps = sum(stage_steps)
    last_step = min(total_steps, config.max_steps) if config.max_steps is not None else total_steps

    new_ids = new_parameter_ids(student)
    new_names = {name for name, p in student.named_parameters() if id(p) in new_ids}  # sharding replaces the ids
    saved_names = [name for name, p in student.named_parameters() if p.requires_grad]
    paths = [name for name, _ in iter_dijiang_layers(unwrapped_from_peft(student))]  # the teacher has the same paths
    progress = {"step": 0, "position": 0, "fingerprint": data_fingerprint(packed.train)}
    optimizer_state = None
    if config.resume and checkpoint_dirs(out):
        folder, progress, optimizer_state = load_newest_checkpoint(out, student, saved_names, accelerator)
        if progress["fingerprint"] != data_fingerprint(packed.train):
            raise ValueError(f"the training data differs from the data of checkpoint {folder}; resume needs the same sources and seed")
        if progress.get("sharded", False) != sharded:
            raise ValueError(f"checkpoint {folder} was written {'with' if progress.get('sharded') else 'without'} FSDP; "
                             "resume it the same way (its optimizer state is laid out for that)")
        if accelerator.is_main_process:
            truncate_log(out / LOG_FILE, progress["step"])
            print(f"resuming from {folder} (step {progress['step']})", file=sys.stderr)
    elif accelerator.is_main_process and (out / LOG_FILE).exists():
        (out / LOG_FILE).unlink()
    if sharded:  # after the resumed weights are in: sharding scatters them
        attention_classes = {type(module) for _, module in iter_dijiang_layers(student)}
        student, teacher = distributed.shard(student, accelerator, attention_classes), distributed.shard(teacher, accelerator)
    accelerator.wait_for_everyone()

    batches = Batches(packed.train, config, accelerator.process_index, world, progress["position"])
    step = progress["step"]
    record: dict = {}
    bar = _progress_bar(config, accelerator, total_steps, last_step, step)
    for stage in (1, 2):
        first = stage_steps[0] if stage == 2 else 0
        stage_end = first + stage_steps[stage - 1]
        if step >= stage_end or step >= last_step:
            continue
        model_for_stage, optimizer = _stage_setup(stage, student, new_names, set(saved_names), config, accelerator)
        if optimizer_state is not None and progress.get("stage", 1 if progress["step"] < stage_steps[0] else 2) == stage:
            if sharded:
                distributed.load_full_optimizer_state(model_for_stage, optimizer, optimizer_state)
            else:
                optimizer.load_state_dict(optimizer_state)
        optimizer_state = None
        warmup = warmup_steps_of(config.warmup, stage_steps[stage - 1])
        while step < min(stage_end, last_step):
            started = time.perf_counter()
            set_lr(optimizer, lr_multiplier(step - first, stage_steps[stage - 1], warmup, config.min_lr_ratio))
            parts, updated = _optimizer_step(stage, model_for_stage, teacher, paths, optimizer, batches, config,
                                             accelerator)
            if not updated:
                raise NonFiniteTraining(non_finite_message(step + 1, parts, out))
            step += 1
            elapsed = time.perf_counter() - started
            record = {"step": step, "stage": stage, "tokens": step * tokens_per_step, **parts,
                      "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": tokens_per_step / elapsed}
            if config.eval_every and step % config.eval_every == 0:
                record.update(_evaluate(student, eval_sets, config, accelerator))
            _log(out, record, bar, accelerator)
            if (config.save_every and step % config.save_every == 0) or step == last_step:
                progress = {"step": step, "stage": stage, "position": batches.stream.position,
                            "fingerprint": data_fingerprint(packed.train), "sharded": sharded}
                save_checkpoint(out, step, accelerator.unwrap_model(model_for_stage), saved_names, optimizer,
                                progress, accelerator, config.keep_checkpoints)
            if on_step is not None:
                on_step(step, record)
        student = accelerator.unwrap_model(model_for_stage)
    if bar is not None:
        bar.close()

    summary = {"steps": step, "tokens": step * tokens_per_step, "last": record, "out": str(out)}
    summary["eval"] = _evaluate(student, eval_sets, config, accelerator)
    if accelerator.is_main_process:
        _write_atomic(out / "summary.json", json.dumps(summary, indent=1))
        if step == total_steps:
            unsharded = _rebuilt_student(config, convert_fn, saved_names, checkpoint_dirs(out)[-1]) if sharded else student
            summary["final"] = _save_final(unsharded, tokenizer, out)
    accelerator.wait_for_everyone()
    summary["model"] = student  # after summary.json: callers in the same process get the trained model
    return summary


def _stage_setup(stage: int, student, new_names: set[str], trained_names: set[str], config: TrainConfig, accelerator):
    """Mark what trains and build the optimizer from the parameters as they are now (sharded ones under FSDP: the
    DiJiang parameters are found by name). Stage 1 trains the new parameters outside of any DDP wrapper (it calls
    attention modules directly, so gradients are averaged by hand); stage 2 wraps the whole model. Sharded, the
    model is already wrapped, for both stages."""
    trained = new_names if stage == 1 else trained_names
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name in trained)
        parameter.grad = None
    named = [(name, p) for name, p in student.named_parameters() if name in trained]
    stage_new_lr = config.attention_transfer_lr if stage == 1 else None
    optimizer = build_optimizer(named, {id(p) for name, p in named if name in new_names}, config, stage_new_lr)
    if distributed.is_sharded(accelerator):
        return student, accelerator.prepare_optimizer(optimizer)
    if stage == 1:
        return student, optimizer
    wrapped, optimizer = accelerator.prepare(student, optimizer)
    return wrapped, optimizer


def _optimizer_step(stage, model, teacher, paths, optimizer, batches, config, accelerator) -> dict:
    sums: dict[str, float] = {}
    for micro in range(config.grad_accum):
        input_ids = batches.next(accelerator.device)
        sync = micro == config.grad_accum - 1 or stage == 1
        with nullcontext() if sync else accelerator.no_sync(model):
            if stage == 1:
                parts = {"loss": attention_transfer_step(model, teacher, paths, input_ids, accelerator)}
                parts["at"] = parts["loss"]
            else:
                parts = distillation_step(model, teacher, input_ids, config, accelerator)
            accelerator.backward(parts["loss"] / config.grad_accum)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() / config.grad_accum
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    if stage == 1 and accelerator.num_processes > 1 and not distributed.is_sharded(accelerator):
        for parameter in trainable:  # no DDP wrapper in stage 1; FSDP reduce-scatters by itself
            if parameter.grad is not None:
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
    # accelerate's clip is DTensor-aware (sharded gradients) and the plain torch clip otherwise; with clipping
    # off, an infinite bound still returns the total norm, which the non-finite check below needs
    norm = accelerator.clip_grad_norm_(model.parameters() if stage == 2 else trainable, config.grad_clip or math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    sums["grad_norm"] = norm.detach().float().to(accelerator.device)
    names = sorted(sums)
    # reduced before the update, so that every rank takes the same decision (a NaN anywhere is NaN everywhere)
    reduced = accelerator.reduce(torch.stack([sums[k] for k in names]), reduction="mean")
    parts = {name: float(value) for name, value in zip(names, reduced.tolist())}
    # fp16's grad scaler skips overflowing steps itself; a non-finite loss is never recoverable
    gradient_ok = math.isfinite(parts["grad_norm"]) or accelerator.scaler is not None
    updated = gradient_ok and all(math.isfinite(value) for name, value in parts.items() if name != "grad_norm")
    if updated:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts, updated


class NonFiniteTraining(ValueError):
    """A step gave a NaN/inf loss or gradient: training stops before the update (checkpoints stay good)."""


def non_finite_message(step: int, parts: dict, out: Path) -> str:
    values = ", ".join(f"{name}={value:.4g}" for name, value in sorted(parts.items()))
    kept = checkpoint_dirs(out)
    where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
    return (f"step {step}: non-finite loss or gradient ({values}); stopped before applying it, {where}, and no "
            "final model was saved. Usual causes: a NaN/inf weight in the model or teacher (load_pretrained warns), "
            "a learning rate too high, or fp16 overflow")


def _evaluate(student, eval_sets: dict, config: TrainConfig, accelerator) -> dict:
    results = {}
    # a sharded model's forward is collective: every rank evaluates the same blocks
    if accelerator.is_main_process or distributed.is_sharded(accelerator):
        model = accelerator.unwrap_model(student)
        for name, blocks in eval_sets.items():
            loss = evaluate_loss(model, blocks, config.batch_size, accelerator, config.progress, f"eval {name}")
            results[f"eval_{name}_loss"] = loss
            results[f"eval_{name}_ppl"] = math.exp(min(loss, 50))
        layers = [layer for _, layer in iter_dijiang_layers(model)]
        with distributed.gathered(layers):  # sharded, each layer holds a slice of its gates
            results.update(gate_summary(layers))
    accelerator.wait_for_everyone()
    return results


def _progress_bar(config, accelerator, total_steps, last_step, step):
    if not (config.progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=last_step, initial=step, desc=f"train ({total_steps} steps)", unit="step", dynamic_ncols=True)


def _log(out: Path, record: dict, bar, accelerator) -> None:
    if not accelerator.is_main_process:
        return
    with (out / LOG_FILE).open("a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
    if bar is not None:
        bar.update(1)
        bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")


def _rebuilt_student(config: TrainConfig, convert_fn, names: list[str], checkpoint: Path):
    """The student unsharded, on the CPU: pretrained weights + the trained ones of `checkpoint` (the buffers
    DiJiang adds are deterministic, and every parameter not trained is pretrained)."""
    model, _ = load_model(config.model)
    student = build_student(model, config, convert_fn)
    load_trained_weights(checkpoint, student, names)
    return student


def _save_final(student, tokenizer, out: Path) -> str | None:
    from dijiang.loading import non_finite_tensors

    final = out / "final"
    model = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    bad = non_finite_tensors(model)
    if bad:
        raise NonFiniteTraining(f"the trained model holds NaN or inf in {len(bad)} tensor(s) (e.g. {bad[0]}); "
                                f"no final model saved")
    try:
        from dijiang.conversion import save_converted

        save_converted(model, tokenizer, final)
    except Exception as error:  # the trained weights are safe in the checkpoints either way
        print(f"warning: could not save the final model with save_pretrained ({type(error).__name__}: {error}); "
              f"the last checkpoint in {out / CHECKPOINT_DIR} holds the trained weights", file=sys.stderr)
        return None
    return str(final)


# ---------------------------------------------------------------- command line


def load_recipe(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such recipe: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path} must be a mapping of option: value")
    TrainConfig.from_dict(values)  # reject unknown options early, with the list of known ones
    return values


def _parse_key_values(items: list[str]) -> dict:
    import yaml

    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        settings[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return settings


def add_cli(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser(
        "train", description="Fine-tune a DiJiang model: optional attention transfer, then KD + LM. "
                    "--recipe FILE.yaml sets defaults; explicit flags override it.",
    )
    parser.add_argument("--recipe", help="YAML file of options (keys as below, with - or _)")
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        # default=SUPPRESS tells recipe values from explicit flags, so the help text states the default itself
        kwargs = {"dest": spec.name, "default": argparse.SUPPRESS, "help": _help_with_default(spec, default)}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, dict):
            kwargs.update(nargs="*", metavar="KEY=VALUE")
        elif isinstance(default, list) or spec.name == "layers":
            kwargs.update(nargs="*", type=spec.metadata.get("type", str))
        else:
            kwargs["type"] = spec.metadata.get("check") or spec.metadata.get("type", type(default))
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(func=run_cli)


def _help_with_default(spec, default) -> str:
    text = spec.metadata["help"]
    if "default" in text:
        return text
    if isinstance(default, bool):
        shown = f"--{'' if default else 'no-'}{spec.name.replace('_', '-')}"
    elif isinstance(default, (list, tuple)):
        shown = " ".join(map(str, default)) or "none"
    elif isinstance(default, dict):
        shown = " ".join(f"{k}={v}" for k, v in default.items()) or "none"
    else:
        shown = "none" if default is None else default
    return f"{text} (default: {shown})"


def config_from_args(args) -> TrainConfig:
    values = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    explicit = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(TrainConfig) if hasattr(args, spec.name)}
    if "attention" in explicit:
        explicit["attention"] = {**values.get("attention", {}), **_parse_key_values(explicit["attention"])}
    return TrainConfig.from_dict({**values, **explicit})


def run_cli(args) -> int:
    summary = train(config_from_args(args))
    print(json.dumps({key: summary[key] for key in ("steps", "tokens", "eval", "out") if key in summary}, indent=1))
    return 0
