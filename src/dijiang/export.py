"""`dijiang export`: a model folder from one checkpoint of a training run.

A run that was stopped (Ctrl-C, SIGTERM, a lost machine) before its last step has checkpoints but no `final/`;
an earlier step may be worth a look too. The run folder's `run_config.json` says how its student was built
(model, DiJiang settings, layers, LoRA); the checkpoint holds the weights that trained, everything else is the
pretrained model's. The folder written is what `final/` would be: `from_pretrained`-ready, LoRA merged.
"""
from __future__ import annotations

import sys
from pathlib import Path

from dijiang.checkpoints import RUN_CONFIG_FILE, checkpoint_dirs, checkpoint_step, load_trained_weights


def checkpoint_folder(run: Path, step: int | None = None) -> Path:
    """The newest checkpoint of `run`, or the one of `step`; a ValueError that lists what there is."""
    folders = {checkpoint_step(folder): folder for folder in checkpoint_dirs(run)}
    if not folders:
        raise ValueError(f"{run} holds no checkpoints (is it a `dijiang train --out` folder?)")
    if step is None:
        return folders[max(folders)]
    if step not in folders:
        raise ValueError(f"{run} has no checkpoint of step {step}; it keeps steps {', '.join(map(str, sorted(folders)))}")
    return folders[step]


def export_checkpoint(run: str | Path, out: str | Path, step: int | None = None, overwrite: bool = False) -> Path:
    """Write the student of `run` at its newest checkpoint (or at `step`) as a model folder `out`."""
    run = _run_folder(run)
    return _export(run, checkpoint_folder(run, step), out, overwrite)


def _run_folder(run: str | Path) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"no such run folder: {run}")
    return run


def _export(run: Path, folder: Path, out: str | Path, overwrite: bool) -> Path:
    from dijiang.files import read_json, refuse_to_replace, same_path
    from dijiang.train import TrainConfig, build_student, load_model, save_student

    config_file = run / RUN_CONFIG_FILE
    if not config_file.exists():
        raise ValueError(f"{run} has no {RUN_CONFIG_FILE}: not a `dijiang train --out` folder, or written before "
                         "runs recorded their configuration (export needs it to rebuild the student)")
    if same_path(out, run) or same_path(out, folder):
        raise ValueError(f"--out {out} is the run folder or its checkpoint; choose another path")
    refuse_to_replace(out, overwrite, "--out")
    config = TrainConfig.from_dict(read_json(config_file))
    model, tokenizer = load_model(config.model)
    student = build_student(model, config, None)
    load_trained_weights(folder, student, [name for name, p in student.named_parameters() if p.requires_grad])
    return save_student(student, tokenizer, Path(out))


def add_cli(subparsers) -> None:
    from dijiang.arguments import non_negative_int

    parser = subparsers.add_parser("export")
    parser.add_argument("run", help="a `dijiang train --out` folder")
    parser.add_argument("--out", required=True, help="the model folder to write")
    parser.add_argument("--step", type=non_negative_int, default=None, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")
    parser.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    run = _run_folder(args.run)
    folder = checkpoint_folder(run, args.step)
    out = _export(run, folder, args.out, args.overwrite)
    print(f"exported {run} at step {checkpoint_step(folder)} -> {out}", file=sys.stderr)
    return 0
