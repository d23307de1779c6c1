"""Fine-tune a converted model against its frozen softmax teacher.

Stage 1 (optional, `attention_transfer_tokens`): only the parameters DiJiang added train, each converted
attention module learning to reproduce its teacher module's output on the teacher's own inputs.
Stage 2: end to end, KD (KL to the teacher's logits) + LM loss, full fine-tuning or LoRA.

One process on CPU, or several under `accelerate launch`: DDP, or FSDP2 (both stages; `dijiang.distributed`
holds what sharding changes). Checkpoints hold everything needed to continue bit for bit after a kill:
trainable weights (safetensors), optimizer state, RNG states of every rank, and the data position (batches are
a pure function of seed and position). SIGINT (Ctrl-C) or SIGTERM stops the run at the end of the step in
flight, after a checkpoint of it: `--resume` then continues as if nothing happened; a second signal stops at once.

This module holds the schedule, the model preparation, the steps and the loop; the options and the flags made
from them are in `dijiang.train_config`, the run's data in `dijiang.train_data`, its folder and checkpoints in
`dijiang.checkpoints`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from dijiang import data as data_lib
from dijiang import distributed
from dijiang.arguments import parse_token_count
from dijiang.attention import gate_summary
from dijiang.capture import first_tensor, module_io
from dijiang.conversion import iter_dijiang_layers
from dijiang.files import write_text_atomic as _write_atomic
from dijiang.losses import attention_transfer_loss, distillation_loss, lm_loss

# The configuration (dijiang.train_config), the run's data (dijiang.train_data) and its folder and checkpoints
# (dijiang.checkpoints) have modules of their own; their public names stay importable from here.
from dijiang.checkpoints import (  # noqa: F401
    CHECKPOINT_DIR, LOG_FILE, RUN_CONFIG_FILE, RUN_FILES, TEACHER_TEXT_FILE, CorruptCheckpoint, check_out_dir,
    checkpoint_dirs, load_checkpoint, load_newest_checkpoint, load_trained_weights, remove_run_files, rng_state,
    save_checkpoint, set_rng_state, trainable_state, truncate_log,
)
from dijiang.train_config import (  # noqa: F401
    DEFAULT_TEACHER_TOKENS, TrainConfig, add_arguments, config_from_args, load_recipe,
)
from dijiang.train_data import (  # noqa: F401
    Batches, blocks_cache_file, data_fingerprint, load_eval_blocks, prepare_data,
)


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
    (new_lr, when given, replaces config.new_lr). With config.mix_lr, the window layers' branch weights
    (`window_mix`) form a fifth group at that peak; without it the groups are the four a checkpoint resumes."""
    new_lr = config.new_lr if new_lr is None else new_lr
    groups = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        is_new = id(parameter) in new_ids
        is_mix = is_new and config.mix_lr is not None and name.rsplit(".", 1)[-1] == "window_mix"
        key = ("mix" if is_mix else "new" if is_new else "pretrained", parameter.ndim >= 2)
        if key not in groups:
            peak = config.mix_lr if is_mix else new_lr if is_new else config.lr
            groups[key] = {"params": [], "weight_decay": config.weight_decay if key[1] else 0.0,
                           "peak_lr": peak, "lr": peak, "name": f"{key[0]}_{'matrix' if key[1] else 'vector'}"}
        groups[key]["params"].append(parameter)
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    return torch.optim.AdamW(list(groups.values()), betas=(config.beta1, config.beta2))


def set_lr(optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * multiplier


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


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during training: the run stopped between two steps, after checkpointing the last one."""


@contextlib.contextmanager
def _stop_requests():
    """While training, SIGINT and SIGTERM only ask the loop to stop (it looks between optimizer steps, so the step
    in flight finishes and is checkpointed); the first signal puts the old handlers back, so a second one stops at
    once. Outside the main thread signals cannot be caught: the list stays empty."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def ask_to_stop(signum, frame):
        requested.append(signum)
        restore()
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint of it "
              f"(send it again to stop at once)", file=sys.stderr)

    for sig in previous:
        signal.signal(sig, ask_to_stop)
    try:
        yield requested
    finally:
        restore()


def _stop_agreed(requested: list[int], accelerator) -> bool:
    """Every rank stops at the same step (a checkpoint is collective under FSDP): one rank's signal stops all."""
    if accelerator.num_processes == 1:
        return bool(requested)
    flag = torch.tensor([float(bool(requested))], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


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
    if accelerator.is_main_process:  # after every rank's check_out_dir: this file is one of the run's
        _write_atomic(out / RUN_CONFIG_FILE, json.dumps(dataclasses.asdict(config), indent=1))

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
    def checkpoint(stage, model_for_stage, optimizer):
        progress = {"step": step, "stage": stage, "position": batches.stream.position,
                    "fingerprint": data_fingerprint(packed.train), "sharded": sharded}
        save_checkpoint(out, step, accelerator.unwrap_model(model_for_stage), saved_names, optimizer, progress,
                        accelerator, config.keep_checkpoints)

    with _stop_requests() as stop_requested:
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
                if accelerator.device.type == "cuda":  # this process's GPU: what FSDP's sharding saves shows here
                    record["gpu_peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                if config.eval_every and step % config.eval_every == 0:
                    record.update(_evaluate(student, eval_sets, config, accelerator))
                _log(out, record, bar, accelerator)
                saved = (config.save_every and step % config.save_every == 0) or step == last_step
                if saved:
                    checkpoint(stage, model_for_stage, optimizer)
                if on_step is not None:
                    on_step(step, record)
                if _stop_agreed(stop_requested, accelerator):
                    if not saved:
                        checkpoint(stage, model_for_stage, optimizer)
                    if bar is not None:
                        bar.close()
                    raise TrainingInterrupted(f"stopped at step {step} of {last_step}; its checkpoint is "
                                              f"{checkpoint_dirs(out)[-1]}: continue with --resume")
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


def save_student(student, tokenizer, folder: Path) -> Path:
    """The trained student as a model folder (LoRA merged into the weights); refuses NaN / inf weights."""
    from dijiang.conversion import save_converted
    from dijiang.loading import non_finite_tensors

    model = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    bad = non_finite_tensors(model)
    if bad:
        raise NonFiniteTraining(f"the trained model holds NaN or inf in {len(bad)} tensor(s) (e.g. {bad[0]}); "
                                f"no model saved")
    return save_converted(model, tokenizer, folder)


def _save_final(student, tokenizer, out: Path) -> str | None:
    final = out / "final"
    try:
        save_student(student, tokenizer, final)
    except NonFiniteTraining:
        raise
    except Exception as error:  # the trained weights are safe in the checkpoints either way
        print(f"warning: could not save the final model with save_pretrained ({type(error).__name__}: {error}); "
              f"the last checkpoint in {out / CHECKPOINT_DIR} holds the trained weights", file=sys.stderr)
        return None
    return str(final)


# ---------------------------------------------------------------- command line


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", description="Fine-tune a DiJiang model: optional attention transfer, then KD + LM. "
                    "--recipe FILE.yaml sets defaults; explicit flags override it.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    try:
        summary = train(config_from_args(args))
    except TrainingInterrupted as stopped:
        print(f"dijiang train: {stopped}", file=sys.stderr)
        return 130  # the shell's code for a run ended by SIGINT
    print(json.dumps({key: summary[key] for key in ("steps", "tokens", "eval", "out") if key in summary}, indent=1))
    return 0
