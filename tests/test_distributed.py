"""FSDP2 on CPU: 2 processes (gloo) under torchrun with the FSDP_* environment that `accelerate launch` derives from
configs/accelerate_fsdp.yaml; the same sharding code as a GPU launch (see dijiang.distributed).

- full fine-tuning, stage 1 (attention transfer) + stage 2: the loss curve and the trained weights equal the
  single-process run's over the same global batch (tolerance: rel 1e-5 on losses, 1e-5 abs on weights; seen
  here: 2e-7 and 2e-6, float32 reductions summed in another order);
- LoRA with 2 micro-batches per step (no gradient sync on the first: FSDP2's requires_gradient_sync), on a model
  with tied embeddings: the same;
- kill -9 mid-run + --resume under FSDP continues exactly like the uninterrupted FSDP run (rel 1e-6);
- the memory arithmetic of the README (parameter counts checked against real models).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dijiang.distributed import LLAMA_3_2_1B, ModelShape, fsdp_memory_per_gpu, memory_table
from dijiang.train import TrainConfig, checkpoint_dirs, train
from helpers import read_log, save_tiny_model, tiny_llama, worker_env, write_text_corpus

TESTS = Path(__file__).parent
REPO = TESTS.parent
FSDP_CONFIG = REPO / "configs" / "accelerate_fsdp.yaml"
KILL_AT = 7  # stage 2 (stages: 2 + 6 steps), after the checkpoint of step 6


def accelerate_fsdp_env(config_file: Path, processes: int) -> dict:
    """The environment `accelerate launch --config_file FILE` gives its processes (its own parser and code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes",
                                                str(processes), "unused.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    return {key: value for key, value in env.items() if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def torchrun(configs: list[Path], port_offset: int, *extra: str, timeout: int = 180):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(30500 + (os.getpid() + port_offset) % 1000), str(TESTS / "ddp_worker.py"), *map(str, configs), *extra]
    env = {**worker_env(), **accelerate_fsdp_env(FSDP_CONFIG, 2)}
    return subprocess.run(launch, env=env, capture_output=True, text=True, timeout=timeout)


def write_config(path: Path, config: TrainConfig) -> Path:
    path.write_text(json.dumps(config.__dict__))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One torchrun launch (process start and imports are most of the time) trains the full fine-tuning and the
    LoRA configs under FSDP (global batch 2 x 2), then the full one again into another folder, killed with -9
    after step KILL_AT; the first two configs also run in one process with batch 4."""
    root = tmp_path_factory.mktemp("fsdp")
    model, corpus = save_tiny_model(root / "model"), write_text_corpus(root / "corpus")
    tied = save_tiny_model(root / "tied", tie_embeddings=True)  # like SmolLM2 and Llama-3.2-1B; accelerate groups them

    def config(name, **overrides):
        values = dict(model=str(model), out=str(root / name), data=[str(corpus)], eval_data=[], tokens="768",
                      attention_transfer_tokens="256", block_size=32, batch_size=2, save_every=3, progress=False)
        return TrainConfig(**{**values, **overrides})

    configs = {"full": config("fsdp_full", held_out=2, eval_blocks=2),  # evaluation is collective when sharded
               "lora": config("fsdp_lora", model=str(tied), lora_rank=4, grad_accum=2),
               "killed": config("fsdp_killed", held_out=2, eval_blocks=2)}
    files = [write_config(root / f"{name}.json", c) for name, c in configs.items()]
    result = torchrun(files, 0, "--kill-at", str(KILL_AT))
    for name in ("full", "lora"):
        assert (Path(configs[name].out) / "summary.json").exists(), result.stderr[-4000:]
    assert result.returncode != 0  # the killed run
    singles = {name: train(TrainConfig(**{**configs[name].__dict__, "out": str(root / f"single_{name}"), "batch_size": 4}))
               for name in ("full", "lora")}
    return {"root": root, "configs": configs, "singles": singles, "killed_file": files[-1]}


def final_trained_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dirs(Path(out))[-1] / "trainable.safetensors"))


def assert_same_losses(got_log: list[dict], want_log: list[dict], rel: float):
    assert [r["step"] for r in got_log] == [r["step"] for r in want_log]
    assert [r["tokens"] for r in got_log] == [r["tokens"] for r in want_log]
    for got, want in zip(got_log, want_log):
        for key in ("loss", "lr") + (("at",) if got["stage"] == 1 else ("kd", "lm")):
            assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-9), (got["step"], key)


@pytest.mark.parametrize("name", ["full", "lora"])
def test_fsdp_matches_one_process_over_the_same_global_batch(runs, name):
    config, single = runs["configs"][name], runs["singles"][name]
    fsdp_log, single_log = read_log(config.out), read_log(single["out"])
    stage_steps = [1, 3] if config.grad_accum == 2 else [2, 6]  # 256 and 768 tokens
    assert [r["stage"] for r in fsdp_log] == [1] * stage_steps[0] + [2] * stage_steps[1]  # stage 1: its own path
    assert_same_losses(fsdp_log, single_log, rel=1e-5)
    fsdp_weights, single_weights = final_trained_weights(config.out), final_trained_weights(single["out"])
    assert sorted(fsdp_weights) == sorted(single_weights)
    if name == "lora":
        assert any("lora_A" in n for n in fsdp_weights) and not any("embed_tokens" in n for n in fsdp_weights)
    for key, tensor in single_weights.items():
        torch.testing.assert_close(fsdp_weights[key], tensor, rtol=0, atol=1e-5)
    # the final model rank 0 rebuilt unsharded holds the trained weights (LoRA merged back into plain weights)
    final = load_file(str(Path(config.out) / "final" / "model.safetensors"))
    single_final = load_file(str(Path(single["out"]) / "final" / "model.safetensors"))
    assert sorted(final) == sorted(single_final)
    for key, tensor in single_final.items():
        torch.testing.assert_close(final[key], tensor, rtol=0, atol=1e-5)
    fsdp_eval = json.loads((Path(config.out) / "summary.json").read_text())["eval"]
    assert fsdp_eval == pytest.approx(single["eval"], rel=1e-5)
    assert ("eval_held_out_loss" in fsdp_eval) == (name == "full")
    assert "slowest_gamma_max" in fsdp_eval  # the gates, read from sharded layers (gathered first)


def test_fsdp_resume_after_kill_9_continues_exactly(runs):
    reference, config = runs["configs"]["full"], runs["configs"]["killed"]
    assert [r["step"] for r in read_log(config.out)][-1] == KILL_AT
    assert checkpoint_dirs(Path(config.out))[-1].name == "step_00000006"
    state = json.loads((checkpoint_dirs(Path(config.out))[-1] / "state.json").read_text())
    assert state["sharded"] is True and state["stage"] == 2

    resumed = torchrun([write_config(runs["killed_file"], TrainConfig(**{**config.__dict__, "resume": True}))], 1)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr
    assert_same_losses(read_log(config.out), read_log(reference.out), rel=1e-6)
    want = final_trained_weights(reference.out)
    for key, tensor in final_trained_weights(config.out).items():
        torch.testing.assert_close(tensor, want[key], rtol=1e-6, atol=1e-7)


def test_single_process_refuses_a_sharded_checkpoint(runs, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(runs["configs"]["full"].out, out)
    with pytest.raises(ValueError, match="written with FSDP"):
        train(TrainConfig(**{**runs["configs"]["full"].__dict__, "out": str(out), "resume": True, "batch_size": 4}))


# ---------------------------------------------------------------- configuration and memory


def test_shipped_accelerate_config_selects_fsdp2_with_transformer_units():
    env = accelerate_fsdp_env(FSDP_CONFIG, 8)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_of_the_memory_arithmetic_matches_a_real_llama(tied):
    model = tiny_llama(vocab_size=320, tie_embeddings=tied)
    config = model.config
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    shape = ModelShape(hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                       vocab=config.vocab_size, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                       tied_embeddings=tied)
    assert shape.parameters() == sum(p.numel() for p in model.parameters())


def test_memory_for_a_1b_model_is_what_the_readme_says():
    assert LLAMA_3_2_1B.parameters() == 1_235_814_400  # the published count of Llama-3.2-1B
    one, eight = fsdp_memory_per_gpu(LLAMA_3_2_1B, 1, 8, 512), fsdp_memory_per_gpu(LLAMA_3_2_1B, 8, 8, 512)
    # the sharded states shrink 8x, the gathered units, activations and logits do not
    for part in ("student_weights", "gradients", "adam_moments", "teacher_weights"):
        assert eight[part] == pytest.approx(one[part] / 8)
    for part in ("gathered_units", "activations", "logits"):
        assert eight[part] == one[part]
    assert one["student_weights"] + one["gradients"] + one["adam_moments"] == pytest.approx(16 * 1_235_814_400 / 2**30)
    lora = fsdp_memory_per_gpu(LLAMA_3_2_1B, 8, 8, 512, lora_fraction=0.01)
    assert lora["adam_moments"] == pytest.approx(eight["adam_moments"] * 0.01)
    readme = (REPO / "README.md").read_text()
    assert memory_table() in readme
