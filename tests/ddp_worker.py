"""Runs `dijiang.train.train` from a JSON config in its own process(es).

    python tests/ddp_worker.py CONFIG.json --kill-at STEP     # SIGKILLs itself right after STEP
    accelerate launch --cpu --num_processes 2 tests/ddp_worker.py CONFIG.json --dump-params
"""
import argparse
import json
import os
import signal
from pathlib import Path

from dijiang.train import TrainConfig, train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--dump-params", action="store_true", help="each rank writes its final parameters")
    args = parser.parse_args()
    config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))

    def on_step(step, record):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    summary = train(config, on_step=on_step)
    if args.dump_params:
        from safetensors.torch import save_file

        rank = int(os.environ.get("RANK", "0"))
        state = {name: p.detach().contiguous() for name, p in summary["model"].named_parameters()}
        save_file(state, str(Path(config.out) / f"params_rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
