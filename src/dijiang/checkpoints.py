"""The training run's folder: checkpoints that hold everything needed to continue bit for bit after a kill
(trainable weights, optimizer state, every rank's RNG state, the data position), reading them back, and the
check that a run replaces or resumes an earlier one only when asked."""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from dijiang import distributed
from dijiang.files import write_text_atomic as _write_atomic
from dijiang.train_config import TrainConfig

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"
TEACHER_TEXT_FILE = "teacher_text.jsonl"


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINT_DIR
    return sorted(root.glob("step_*")) if root.exists() else []


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder holds (save_checkpoint names it step_NNNNNNNN)."""
    return int(folder.name.removeprefix("step_"))


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
RUN_CONFIG_FILE = "run_config.json"  # the run's TrainConfig: what `dijiang export` rebuilds the student from
RUN_FILES = (CHECKPOINT_DIR, LOG_FILE, TEACHER_TEXT_FILE, RUN_CONFIG_FILE, "summary.json", "final")


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
