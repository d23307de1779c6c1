"""Runs `dijiang.train.train` from JSON configs in its own process(es), one config after the other.

    python tests/ddp_worker.py CONFIG.json --kill-at STEP     # SIGKILLs itself right after STEP (of the last config)
    torchrun --nproc_per_node 2 tests/ddp_worker.py CONFIG.json --term-rank-1-at STEP   # SIGTERM to rank 1 only
    accelerate launch --cpu --num_processes 2 tests/ddp_worker.py CONFIG.json --dump-params
    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ... torchrun --nproc_per_node 2 tests/ddp_worker.py A.json B.json
"""
import argparse
import json
import os
import signal
from pathlib import Path

from dijiang.train import TrainConfig, train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="+", help="several: one launch (process start, imports) for all")
    parser.add_argument("--kill-at", type=int, help="SIGKILL right after this step of the last config")
    parser.add_argument("--term-rank-1-at", type=int, help="rank 1 sends itself SIGTERM right after this step")
    parser.add_argument("--dump-params", action="store_true", help="each rank writes its final parameters")
    args = parser.parse_args()

    def kill_at(step, record):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.term_rank_1_at and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGTERM)

    for index, path in enumerate(args.configs):
        config = TrainConfig.from_dict(json.loads(Path(path).read_text()))
        summary = train(config, on_step=kill_at if index == len(args.configs) - 1 else None)
        if args.dump_params:
            dump_params(summary["model"], config)


def dump_params(model, config):
    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", "0"))
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(state, str(Path(config.out) / f"params_rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
