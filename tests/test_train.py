"""Training loop on a tiny Llama: schedule, budgets, options, stages, checkpoints, exact resume after kill -9, DDP."""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dijiang.train import (
    TrainConfig, TrainingInterrupted, add_cli, checkpoint_dirs, config_from_args, lr_multiplier, parse_token_count,
    train, warmup_steps_of,
)
from helpers import read_log, save_tiny_model, tiny_tokenizer, worker_env, write_text_corpus

TESTS = Path(__file__).parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_assets")
    return {"model": save_tiny_model(root / "model"), "corpus": write_text_corpus(root / "corpus")}


def small_config(assets, out, **overrides) -> TrainConfig:
    values = dict(model=str(assets["model"]), out=str(out), data=[str(assets["corpus"])], eval_data=[],
                  tokens="1536", block_size=32, batch_size=4, save_every=3, progress=False)
    return TrainConfig(**{**values, **overrides})


# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("text, expected", [
    ("20M", 20_000_000), ("500k", 500_000), ("1.5M", 1_500_000), ("2G", 2_000_000_000), ("300", 300),
    (4096, 4096), ("2e6", 2_000_000), (" 7 K ", 7000), ("1.5B", 1_500_000_000), ("40_000", 40_000),
])
def test_parse_token_count(text, expected):
    assert parse_token_count(text) == expected


@pytest.mark.parametrize("bad", ["20X", "M", "", "-5", "1,000", True])
def test_parse_token_count_rejects_garbage(bad):
    with pytest.raises(ValueError):
        parse_token_count(bad)


def test_warmup_then_cosine_schedule_values():
    total, warmup, floor = 110, 10, 0.1
    values = [lr_multiplier(step, total, warmup, floor) for step in range(total)]
    assert values[:3] == pytest.approx([0.1, 0.2, 0.3]) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    middle = 10 + (total - 1 - 10) / 2  # halfway through the decay: floor + (1 - floor) / 2
    assert lr_multiplier(middle, total, warmup, floor) == pytest.approx(0.55)
    assert values[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert lr_multiplier(0, 1, 0, 0.1) == pytest.approx(1.0)
    assert warmup_steps_of(0.05, 1000) == 50 and warmup_steps_of(200, 1000) == 200


# ---------------------------------------------------------------- configuration and errors


def test_unknown_options_are_rejected_with_the_known_list(tmp_path):
    with pytest.raises(ValueError, match="unknown training option.*'learning_rate'.*known"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("tokens: 1M\nbatch_sise: 4\n")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    with pytest.raises(ValueError, match="batch_sise"):
        config_from_args(parser.parse_args(["train", "--recipe", str(recipe)]))


def test_recipe_sets_defaults_and_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tokens: 1M\nblock-size: 128\nlr: 3.0e-4\nattention: {window: 16, feature_map: dijiang}\n"
                      "data: [a.txt, b]\n")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["train", "--recipe", str(recipe), "--tokens", "2M", "--attention", "window=8",
                              "--no-progress", "--layers", "0", "1"])
    config = config_from_args(args)
    assert args.func.__name__ == "run_cli"
    assert (config.tokens, config.block_size, config.lr, config.progress) == ("2M", 128, 3e-4, False)
    assert config.attention == {"window": 8, "feature_map": "dijiang"}
    assert config.data == ["a.txt", "b"] and config.layers == [0, 1]


def test_every_shipped_recipe_is_a_valid_training_config():
    """recipes/ and recipes/long-context/: the config and its attention settings (a typo there fails at launch)."""
    from dijiang.attention import DiJiangSettings
    from dijiang.train import load_recipe

    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 20
    for recipe in recipes:
        config = TrainConfig.from_dict(load_recipe(recipe)).validated()
        assert config.tokens and config.block_size >= 1, recipe
        DiJiangSettings.from_any(config.attention)


def test_budget_smaller_than_one_block_is_an_error(assets, tmp_path):
    with pytest.raises(ValueError, match="smaller than one block"):
        train(small_config(assets, tmp_path / "out", tokens="16"))
    with pytest.raises(ValueError, match="token count"):
        train(small_config(assets, tmp_path / "out", tokens="lots"))


def test_missing_and_empty_data_are_errors(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(small_config(assets, tmp_path / "a", data=[str(tmp_path / "nope")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no training text"):
        train(small_config(assets, tmp_path / "b", data=[str(tmp_path / "empty")]))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="fewer than one block"):
        train(small_config(assets, tmp_path / "c", data=[str(tmp_path / "short.txt")]))


def test_teacher_with_another_tokenizer_is_refused(assets, tmp_path):
    other = save_tiny_model(tmp_path / "other", tokenizer=tiny_tokenizer(vocab_size=330))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        train(small_config(assets, tmp_path / "out", teacher=str(other)))


# ---------------------------------------------------------------- training runs


def test_two_stage_run_logs_checkpoints_evaluates_and_saves(assets, tmp_path):
    out = tmp_path / "out"
    config = small_config(assets, out, attention_transfer_tokens="512", eval_data=["pydoc"], eval_blocks=2,
                          held_out=2, save_every=5, keep_checkpoints=2)
    summary = train(config)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 17))  # 512/128 + 1536/128 steps
    assert [r["stage"] for r in log] == [1] * 4 + [2] * 12
    assert all(set(r) >= {"step", "tokens", "loss", "lr", "tokens_per_s"} for r in log)
    assert "at" in log[0] and {"kd", "lm"} <= set(log[-1])
    assert all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["tokens"] == 16 * 128
    assert log[-1]["lr"] == pytest.approx(config.lr * config.min_lr_ratio)
    assert [d.name for d in checkpoint_dirs(out)] == ["step_00000015", "step_00000016"]
    assert not list((out / "checkpoints").glob(".tmp*"))
    assert set(summary["eval"]) == {"eval_held_out_loss", "eval_held_out_ppl", "eval_pydoc_loss", "eval_pydoc_ppl",
                                    "slowest_gamma_min", "slowest_gamma_max"}  # pure DiJiang: decays, no mix
    assert 0 < summary["eval"]["slowest_gamma_min"] <= summary["eval"]["slowest_gamma_max"] < 1
    assert summary["final"] and (out / "final" / "config.json").exists()
    with pytest.raises(ValueError, match="--resume"):
        train(config)


@pytest.mark.parametrize("attention", [None, dict(window=8, sinks=2, state_update="delta", decay_gate=True)])
def test_attention_transfer_trains_only_the_new_parameters(assets, tmp_path, attention):
    """The default layer, and a window layer with a delta branch (its beta, gate and mix among the new ones)."""
    from dijiang.loading import load_pretrained
    from dijiang.train import new_parameter_ids

    extra = {} if attention is None else dict(attention=attention)
    summary = train(small_config(assets, tmp_path / "out", attention_transfer_tokens="512", max_steps=4, **extra))
    student = summary["model"]
    original, _ = load_pretrained(str(assets["model"]))
    before = dict(original.named_parameters())
    new_ids = new_parameter_ids(student)
    changed_new = 0
    for name, parameter in student.named_parameters():
        if id(parameter) in new_ids:
            changed_new += 1
        else:
            assert torch.equal(parameter, before[name]), name
    assert changed_new > 0
    log = read_log(tmp_path / "out")
    assert log[-1]["at"] < log[0]["at"]


def test_attention_transfer_has_its_own_learning_rate(assets, tmp_path):
    from dijiang.train import lr_multiplier, warmup_steps_of

    config = small_config(assets, tmp_path / "out", attention_transfer_tokens="512", attention_transfer_lr=0.05,
                          new_lr=1e-3, lr=1e-4, tokens="512")
    train(config)
    log = read_log(tmp_path / "out")
    stages = {1: [r for r in log if r["stage"] == 1], 2: [r for r in log if r["stage"] == 2]}
    assert len(stages[1]) == len(stages[2]) == 4
    for stage, peak in ((1, 0.05), (2, 1e-4)):  # stage 2's first group holds the pretrained weights
        rows = stages[stage]
        for index, record in enumerate(rows):
            multiplier = lr_multiplier(index, len(rows), warmup_steps_of(config.warmup, len(rows)), config.min_lr_ratio)
            assert record["lr"] == pytest.approx(peak * multiplier)


def test_lora_trains_adapters_and_new_parameters_only(assets, tmp_path):
    out = tmp_path / "out"
    train(small_config(assets, out, lora_rank=4, tokens="512"))
    names = list(load_file(str(checkpoint_dirs(out)[-1] / "trainable.safetensors")))
    assert any("lora_A" in n for n in names) and any("decay" in n for n in names)
    assert not any(n.endswith("mlp.up_proj.weight") or "embed_tokens" in n for n in names)
    assert (out / "final" / "config.json").exists()  # merged back into plain weights


def test_resume_after_kill_9_continues_bit_for_bit(assets, tmp_path):
    config = small_config(assets, tmp_path / "killed", attention_transfer_tokens="256", save_every=3,
                          grad_accum=2, batch_size=2)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.__dict__))
    worker = [sys.executable, str(TESTS / "ddp_worker.py"), str(config_file)]
    killed = subprocess.run(worker + ["--kill-at", "8"], env=worker_env(), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["step"] for r in read_log(config.out)][-1] == 8
    assert checkpoint_dirs(Path(config.out))[-1].name == "step_00000006"

    resumed_config = {**config.__dict__, "resume": True}
    config_file.write_text(json.dumps(resumed_config))
    resumed = subprocess.run(worker, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    reference_config = {**config.__dict__, "out": str(tmp_path / "reference")}
    config_file.write_text(json.dumps(reference_config))
    reference = subprocess.run(worker, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stderr[-2000:]

    after, expected = read_log(config.out), read_log(reference_config["out"])
    assert [r["step"] for r in after] == [r["step"] for r in expected] == list(range(1, 15))
    for got, want in zip(after, expected):
        for key in ("loss", "lr", "tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (got["step"], key)
    final = load_file(str(checkpoint_dirs(Path(config.out))[-1] / "trainable.safetensors"))
    final_reference = load_file(str(checkpoint_dirs(Path(reference_config["out"]))[-1] / "trainable.safetensors"))
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, final_reference[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_continues_exactly(assets, tmp_path, signum):
    def signal_at_step_4(step, record):
        if step == 4:
            os.kill(os.getpid(), signum)

    config = small_config(assets, tmp_path / "stopped", attention_transfer_tokens="256", save_every=3)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="stopped at step 4 of 14.*--resume"):
        train(config, on_step=signal_at_step_4)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    assert [d.name for d in checkpoint_dirs(Path(config.out))][-1] == "step_00000004"  # not only step 3's
    assert [r["step"] for r in read_log(config.out)] == [1, 2, 3, 4] and not (Path(config.out) / "final").exists()

    train(TrainConfig(**{**config.__dict__, "resume": True}))
    reference = small_config(assets, tmp_path / "reference", attention_transfer_tokens="256", save_every=3)
    train(reference)
    after, expected = read_log(config.out), read_log(reference.out)
    assert [r["step"] for r in after] == [r["step"] for r in expected] == list(range(1, 15))
    for got, want in zip(after, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-9), got["step"]
    final = load_file(str(checkpoint_dirs(Path(config.out))[-1] / "trainable.safetensors"))
    final_reference = load_file(str(checkpoint_dirs(Path(reference.out))[-1] / "trainable.safetensors"))
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, final_reference[name], rtol=1e-6, atol=1e-7)


def test_dijiang_train_stopped_by_sigterm_exits_130_and_says_how_to_resume(assets, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "dijiang", "train", "--model", str(assets["model"]), "--data", str(assets["corpus"]),
               "--out", str(out), "--tokens", "1M", "--block-size", "32", "--batch-size", "4", "--save-every", "0",
               "--no-progress"]
    process = subprocess.Popen(command, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text().strip():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "SIGTERM: stopping after this step" in stderr and "continue with --resume" in stderr
    step = read_log(out)[-1]["step"]
    assert checkpoint_dirs(out)[-1].name == f"step_{step:08d}"  # --save-every 0 wrote none before the signal


def test_export_writes_the_model_of_a_stopped_run_at_its_newest_or_a_named_checkpoint(assets, tmp_path):
    from dijiang.cli import main
    from dijiang.export import export_checkpoint
    from transformers import AutoModelForCausalLM

    config = small_config(assets, tmp_path / "run", attention_transfer_tokens="256", save_every=3, lora_rank=4,
                          keep_checkpoints=0, max_steps=7)  # ends at step 7 of 14: checkpoints, no final/
    summary = train(config)
    assert not (Path(config.out) / "final").exists() and json.loads((Path(config.out) / "run_config.json").read_text())["lora_rank"] == 4
    newest = export_checkpoint(config.out, tmp_path / "step7")
    exported = AutoModelForCausalLM.from_pretrained(newest, trust_remote_code=True)
    trained = summary["model"].merge_and_unload()
    batch = torch.randint(0, exported.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=batch).logits, trained(input_ids=batch).logits, rtol=1e-4, atol=1e-4)

    assert main(["export", config.out, "--out", str(tmp_path / "step3"), "--step", "3"]) == 0
    at_step_3 = AutoModelForCausalLM.from_pretrained(tmp_path / "step3", trust_remote_code=True)
    with torch.no_grad():
        assert not torch.allclose(at_step_3(input_ids=batch).logits, exported(input_ids=batch).logits)
    with pytest.raises(ValueError, match="no checkpoint of step 5; it keeps steps 3, 6, 7"):
        export_checkpoint(config.out, tmp_path / "other", step=5)
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        export_checkpoint(config.out, tmp_path / "step7")
    assert main(["export", str(tmp_path / "step7"), "--out", str(tmp_path / "x")]) == 2  # a model, not a run


def test_a_signal_to_one_ddp_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(assets, tmp_path):
    config = small_config(assets, tmp_path / "ddp", tokens="768", batch_size=2, save_every=0)
    config_file = tmp_path / "ddp.json"
    config_file.write_text(json.dumps(config.__dict__))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(29000 + os.getpid() % 500), str(TESTS / "ddp_worker.py"), str(config_file), "--term-rank-1-at", "2"]
    result = subprocess.run(launch, env=worker_env(), capture_output=True, text=True, timeout=150)
    assert result.returncode != 0 and "stopped at step 2 of 6" in result.stderr, result.stderr[-3000:]
    assert [r["step"] for r in read_log(config.out)] == [1, 2]
    assert [d.name for d in checkpoint_dirs(Path(config.out))] == ["step_00000002"]
    assert sorted(p.name for p in checkpoint_dirs(Path(config.out))[0].glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]


def test_a_second_signal_stops_at_once(assets, tmp_path):
    def two_signals_at_step_2(step, record):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the first put the default handler back: this one raises here

    config = small_config(assets, tmp_path / "stopped", save_every=3)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(config, on_step=two_signals_at_step_2)
    assert not isinstance(stopped.value, TrainingInterrupted) and checkpoint_dirs(Path(config.out)) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ddp_on_cpu_matches_one_process_over_the_same_global_batch(assets, tmp_path):
    ddp_config = small_config(assets, tmp_path / "ddp", attention_transfer_tokens="256", tokens="768",
                              batch_size=2, save_every=0)
    config_file = tmp_path / "ddp.json"
    config_file.write_text(json.dumps(ddp_config.__dict__))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(29500 + os.getpid() % 1000), str(TESTS / "ddp_worker.py"), str(config_file), "--dump-params"]
    result = subprocess.run(launch, env=worker_env(), capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]

    single = train(small_config(assets, tmp_path / "single", attention_transfer_tokens="256", tokens="768",
                                batch_size=4, save_every=0))
    ddp_log, single_log = read_log(ddp_config.out), read_log(tmp_path / "single")
    assert [r["tokens"] for r in ddp_log] == [r["tokens"] for r in single_log]
    for got, want in zip(ddp_log, single_log):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-7), got["step"]
    rank0 = load_file(str(Path(ddp_config.out) / "params_rank0.safetensors"))
    rank1 = load_file(str(Path(ddp_config.out) / "params_rank1.safetensors"))
    single_params = dict(single["model"].named_parameters())
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name
        torch.testing.assert_close(tensor, single_params[name].detach(), rtol=1e-4, atol=1e-5)
