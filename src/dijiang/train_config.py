"""`dijiang train`'s configuration: TrainConfig (every option, checked), recipes (YAML files of options) and the
command-line flags made from its fields."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from dijiang.arguments import (fraction, non_negative_float, non_negative_int, parse_bool, parse_token_count,
                               positive_float, positive_int)
from dijiang.attention import DiJiangSettings

DEFAULT_TEACHER_TOKENS = 100_000  # sampled from the teacher when no data source is given


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
    retrieval_documents: int = field(default=0, metadata=_help(
        "synthetic retrieval documents added to the training text, about 3 x block-size characters each: facts "
        "hidden in spans of the training text and asked about later (dijiang.retrieval_data; wording unlike the "
        "passkey evaluation's)", check=non_negative_int))
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
    mix_lr: float | None = field(default=None, metadata=_help(
        "peak learning rate of the window layers' branch weights (window_mix), in their own group: a weight that "
        "starts at 0.1 moves ~new_lr a step (default: --new-lr, in the new parameters' group)",
        type=float, check=positive_float))
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


def add_arguments(parser) -> None:
    """--recipe and one flag per TrainConfig field."""
    import argparse

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
