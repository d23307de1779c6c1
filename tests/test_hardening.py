"""Issue 17: no silent wrong result, no lost file. One test (or a few) per item, each asserting the error or the
preserved file; tiny random models, CPU, seconds."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from helpers import save_tiny_model, tiny_llama, tiny_tokenizer, write_text_corpus

import dijiang
from dijiang import conversion, loading
from dijiang.cli import main
from dijiang.train import NonFiniteTraining, TrainConfig, checkpoint_dirs, train

TEXT = "The quick brown fox jumps over the lazy dog. In Python, a list comprehension builds a list. " * 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    return {"model": save_tiny_model(root / "model"), "corpus": write_text_corpus(root / "corpus", n_files=3)}


def small_config(assets, out, **overrides) -> TrainConfig:
    values = dict(model=str(assets["model"]), out=str(out), data=[str(assets["corpus"])], eval_data=[],
                  tokens="1536", block_size=32, batch_size=4, save_every=3, keep_checkpoints=1, progress=False,
                  data_cache=False)
    return TrainConfig(**{**values, **overrides})


def nan_model(folder: Path) -> Path:
    """The tiny model with one NaN weight, saved."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- 1. NaN


def test_nan_mid_run_stops_keeps_the_good_checkpoint_and_saves_no_final(assets, tmp_path):
    out, students = tmp_path / "out", []

    def convert_and_keep(model, settings, layers):
        students.append(dijiang.convert(model, settings, layers))
        return students[-1]

    def poison_after_step_3(step, _record):
        if step == 3:
            with torch.no_grad():
                students[0].model.norm.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteTraining, match=r"step 4: non-finite loss.*step_00000003"):
        train(small_config(assets, out), convert_fn=convert_and_keep, on_step=poison_after_step_3)
    assert [d.name for d in checkpoint_dirs(out)] == ["step_00000003"]  # not rotated out by a NaN one
    saved = load_file(str(checkpoint_dirs(out)[0] / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (out / "final").exists()


def test_nan_teacher_stops_the_cli_with_a_warning_and_exit_2(assets, tmp_path, capsys):
    teacher = nan_model(tmp_path / "nan_teacher")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="hold NaN or inf"):
        code = main(["train", "--model", str(assets["model"]), "--teacher", str(teacher), "--data",
                     str(assets["corpus"]), "--block-size", "32", "--batch-size", "2", "--tokens", "320",
                     "--eval-data", "--no-progress", "--no-data-cache", "--out", str(out)])
    assert code == 2 and "step 1: non-finite loss" in capsys.readouterr().err
    assert not (out / "final").exists() and not checkpoint_dirs(out)


def test_convert_warns_on_non_finite_weights(tmp_path):
    with pytest.warns(UserWarning, match="1 weight tensor.*model.norm.weight"):
        assert main(["convert", "--model", str(nan_model(tmp_path / "nan")), "--out", str(tmp_path / "o")]) == 0


# ---------------------------------------------------------------- 2. files


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    from dijiang.demo import run_demo

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "keep.txt").write_text("someone's run")
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="--overwrite"):
        run_demo(tiny_llama(len(tokenizer)), tokenizer, out=tmp_path, log=lambda _: None)
    assert (tmp_path / "train" / "keep.txt").read_text() == "someone's run"


def test_bench_report_defaults_outside_docs():
    from script_loader import load_script

    from dijiang.cli import build_parser

    assert load_script("benchmarks/bench_model.py").build_parser().parse_args([]).out == "runs/bench/bench_model.md"
    assert not hasattr(build_parser("bench").parse_args(["bench"]), "out")  # `dijiang bench` writes no report


def test_convert_never_replaces_its_source_or_an_existing_folder(tmp_path, capsys):
    source = save_tiny_model(tmp_path / "source")
    before = (source / "model.safetensors").read_bytes()
    assert main(["convert", "--model", str(source), "--out", str(source), "--overwrite"]) == 2
    assert "is the source model" in capsys.readouterr().err
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "notes.txt").write_text("mine")
    assert main(["convert", "--model", str(source), "--out", str(previous)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (previous / "notes.txt").exists()
    assert main(["convert", "--model", str(source), "--out", str(previous), "--overwrite"]) == 0
    assert (previous / "config.json").exists() and not (previous / "notes.txt").exists()
    assert (source / "model.safetensors").read_bytes() == before


def test_a_failed_save_leaves_the_old_folder_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    tokenizer = tiny_tokenizer()
    model = dijiang.convert(tiny_llama(len(tokenizer)))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        conversion.save_converted(model, tokenizer, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and os.listdir(out) == ["config.json"]


def test_train_refuses_a_finished_run_and_resume_refuses_a_missing_folder(assets, tmp_path):
    finished = tmp_path / "finished"
    (finished / "final").mkdir(parents=True)
    (finished / "final" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="earlier run.*--overwrite"):
        train(small_config(assets, finished))
    with pytest.raises(ValueError, match="nothing to resume"):
        train(small_config(assets, finished, resume=True))
    assert (finished / "final" / "config.json").read_text() == "{}"
    typo = tmp_path / "tpyo"
    with pytest.raises(FileNotFoundError, match="does not exist, nothing to resume"):
        train(small_config(assets, typo, resume=True))
    assert not typo.exists()


def test_embedded_cache_write_is_atomic_and_a_torn_cache_is_rebuilt(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer()
    monkeypatch.setenv("DIJIANG_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "embedded_gguf", lambda name: (tmp_path, "x.gguf"))
    monkeypatch.setattr(loading, "_load_gguf", lambda folder, gguf, kwargs: (tiny_llama(len(tokenizer)), tokenizer))
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "config.json").write_text("{}")  # what a kill during the old write left
    cached = Path(loading.model_folder("smollm2"))
    assert (cached / "model.safetensors").exists() and json.loads((cached / "config.json").read_text())

    monkeypatch.setattr(type(tokenizer), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    other = tmp_path / "other"
    monkeypatch.setenv("DIJIANG_CACHE", str(other))
    with pytest.raises(KeyboardInterrupt):
        loading.model_folder("smollm2")
    assert not (other / "smollm2").exists()


# ---------------------------------------------------------------- 3. numbers, booleans, settings


@pytest.mark.parametrize("argv, option", [
    (["eval", "--batch-size", "-1"], "--batch-size"),
    (["eval", "--max-tokens", "-10"], "--max-tokens"),
    (["eval", "--fidelity-tokens", "0"], "--fidelity-tokens"),
    (["eval", "--passkey-trials", "0"], "--passkey-trials"),
    (["eval", "--passkey", "0"], "--passkey"),
    (["train", "--grad-clip", "-1"], "--grad-clip"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--max-steps", "0"], "--max-steps"),
    (["train", "--warmup", "-0.5"], "--warmup"),
    (["train", "--held-out", "-1"], "--held-out"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "--prompt", "x", "--top-p", "7"], "--top-p"),
    (["bench", "--contexts", "0"], "--contexts"),
    (["bench", "--batches", "0"], "--batches"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["convert", "--out", "x", "--window", "-1"], "--window"),
    (["convert", "--out", "x", "--layers", "0.7"], "--layers"),
])
def test_bad_numbers_fail_at_parse_time_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2 and f"argument {option}: must be" in capsys.readouterr().err


def test_recipe_booleans_read_no_as_false_and_reject_ambiguous(tmp_path):
    from dijiang.train import config_from_args, add_cli
    import argparse

    recipe = tmp_path / "r.yaml"
    recipe.write_text('data_cache: "no"\nprogress: "false"\n')
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    config = config_from_args(parser.parse_args(["train", "--recipe", str(recipe)])).validated()
    assert config.data_cache is False and config.progress is False
    with pytest.raises(ValueError, match="resume must be true or false"):
        TrainConfig(resume="sometimes").validated()
    assert dijiang.DiJiangSettings(use_gate="no").use_gate is False


@pytest.mark.parametrize("settings, layers, message", [
    ({"window": 1.5}, None, "window .* must be an integer"),
    ({"window": True}, None, "window .* must be an integer"),
    ({"window": 100_000}, None, "<= 65536"),
    ({}, [0.7], "layer indices must be integers"),
    ({}, [], "layers is empty"),
    ({}, [2], "out of range"),
])
def test_convert_validates_settings_and_layers(settings, layers, message):
    model = tiny_llama(64)
    with pytest.raises(ValueError, match=message):
        dijiang.convert(model, settings, layers)


def test_train_checks_attention_settings_before_loading_a_model():
    with pytest.raises(ValueError, match="window .* must be an integer"):
        TrainConfig(model="/nonexistent/model", attention={"window": True}).validated()


# ---------------------------------------------------------------- 4. official feature map


def test_official_feature_map_round_trips_and_convert_official_sets_it(tmp_path):
    source = save_tiny_model(tmp_path / "source")
    out = tmp_path / "official"
    assert main(["convert", "--model", str(source), "--out", str(out), "--official"]) == 0
    assert json.loads((out / "config.json").read_text())["dijiang"]["feature_map"] == "official"
    model, _ = dijiang.load_pretrained(str(out))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.arange(12)[None]
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert type(model.model.layers[0].self_attn.feature_map).__name__ == "OfficialFeatureMap"


# ---------------------------------------------------------------- 5. window cost


def test_window_far_longer_than_the_input_costs_what_the_input_needs():
    from dijiang.ops import window_attention

    gen = torch.Generator().manual_seed(0)
    B, T, H, d, m = 1, 20, 2, 4, 6
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for _ in range(3))
    qf, kf = (torch.rand(B, T, H, m, generator=gen) for _ in range(2))
    log_decay, lin_weight = -torch.rand(H, generator=gen), torch.rand(H, generator=gen) + 0.1
    inputs = (q, k, v, qf, kf, log_decay, lin_weight)
    # [window, 2 window] chunks at window 16384 need 4 GiB of scores per head; the dense form needs kilobytes
    big = 16384
    o_recurrent, s_recurrent = window_attention(*inputs, window=big, mode="recurrent", output_final_state=True)
    o_chunk, s_chunk = window_attention(*inputs, window=big, mode="chunk", output_final_state=True)
    assert torch.allclose(o_chunk, o_recurrent, atol=1e-5)
    assert torch.allclose(s_chunk["S"], s_recurrent["S"], atol=1e-5) and torch.equal(s_chunk["k"], s_recurrent["k"])
    # with a carried state (buffered tokens), split calls equal one call of the reference
    o_ref, _ = window_attention(*inputs, window=32, mode="parallel")
    first = [x[:, :7] for x in inputs[:5]] + [log_decay, lin_weight]
    second = [x[:, 7:] for x in inputs[:5]] + [log_decay, lin_weight]
    o1, state = window_attention(*first, window=32, mode="chunk", output_final_state=True)
    o2, _ = window_attention(*second, window=32, mode="chunk", initial_state=state)
    assert torch.allclose(torch.cat([o1, o2], dim=1), o_ref, atol=1e-5)


# ---------------------------------------------------------------- 6. tokenizers


def test_eval_refuses_a_student_with_another_tokenizer(tmp_path, capsys):
    teacher = save_tiny_model(tmp_path / "teacher")
    other = save_tiny_model(tmp_path / "student", tokenizer=tiny_tokenizer(text_start=200_000))
    assert main(["eval", "--teacher", str(teacher), "--student", str(other), "--string", TEXT, "--window", "32",
                 "--max-windows", "1"]) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err


# ---------------------------------------------------------------- 7. smaller ones


def test_corrupt_newest_checkpoint_falls_back_to_the_older_one(assets, tmp_path, capsys):
    out = tmp_path / "out"
    train(small_config(assets, out, save_every=2, keep_checkpoints=2, max_steps=4))
    newest = checkpoint_dirs(out)[-1]
    (newest / "trainable.safetensors").write_bytes(b"torn")
    summary = train(small_config(assets, out, save_every=2, keep_checkpoints=2, max_steps=6, resume=True))
    err = capsys.readouterr().err
    assert "step_00000004/trainable.safetensors cannot be read" in err and "resuming from" in err
    assert "step_00000002 (step 2)" in err and summary["steps"] == 6


def test_json_errors_name_the_file(assets, tmp_path):
    from dijiang.files import read_jsonl

    out = tmp_path / "out"
    train(small_config(assets, out, save_every=2, max_steps=2))
    (checkpoint_dirs(out)[-1] / "state.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"step_00000002/state.json cannot be read"):
        train(small_config(assets, out, resume=True))
    log = out / "log.jsonl"
    log.write_text('{"step": 1}\n{oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not valid JSON"):
        read_jsonl(log)
    from script_loader import load_script

    bench_main = load_script("benchmarks/bench_model.py").main

    (tmp_path / "run.json").write_text("{truncated")
    with pytest.raises(ValueError, match=r"run.json: not valid JSON"):
        bench_main(["--from-json", str(tmp_path / "run.json"), "--out", str(tmp_path / "report.md")])


@pytest.mark.parametrize("name", ["runs/dijiang-missing", "./dijiang-missing", "~/dijiang-missing-x",
                                  "/nonexistent/dijiang"])
def test_missing_local_paths_fail_at_once(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", no_hub)
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        loading.load_pretrained(name)


def test_generate_chat_fast_uses_the_chat_template(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "chat")
    args = ["generate", "--model", str(folder), "--prompt", "the cat", "--max-new-tokens", "4", "--chat"]
    assert main(args + ["--fast"]) == 2 and "no chat template" in capsys.readouterr().err
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = "{% for m in messages %}<user> {{ m['content'] }} <bot>{% endfor %}"
    tokenizer.save_pretrained(folder)
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--fast"]) == 0
    assert capsys.readouterr().out.strip() == plain.strip()
    assert main(args[:-1] + ["--fast"]) == 0  # a tokenizer with a template: chat by default
    assert capsys.readouterr().out.strip() == plain.strip()
    assert main(args[:-1] + ["--no-chat", "--fast"]) == 0
    assert capsys.readouterr().out.strip() != plain.strip()  # --no-chat: another prompt, other tokens


def test_unsupported_family_gets_a_short_error(tmp_path):
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="'t5' model.*supported families: .*llama") as raised:
        loading.load_pretrained(str(tmp_path / "t5"))
    assert len(str(raised.value)) < 400
