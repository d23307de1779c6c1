"""scripts/quality_run.py: job configs (the recipe job is the recipe file) and the report, on fake results."""
import json

import pytest
from script_loader import ROOT, load_script


@pytest.fixture(scope="module")
def quality_run():
    return load_script("scripts/quality_run.py")


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part-000.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    return folder


def test_every_job_builds_a_valid_config(quality_run, corpus, tmp_path):
    for name in quality_run.JOBS:
        config = quality_run.job_config(name, "smollm2", corpus, tmp_path / "runs")
        assert config.out == str(tmp_path / "runs" / name)
        assert config.data == [str(corpus / "part-000.jsonl")]


def test_recipe_job_runs_the_recipe_file(quality_run, corpus, tmp_path):
    from dijiang.train import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "window128-1k-blocks.yaml")
    config = quality_run.job_config("hybrid-w128-20m", "/models/hf", corpus, tmp_path)
    for key in ("block_size", "batch_size", "grad_accum", "lr", "new_lr", "kd_weight", "lm_weight", "eval_every"):
        assert getattr(config, key) == recipe[key], key
    assert config.attention == recipe["attention"] == {"window": 128}
    assert config.model == "/models/hf" and config.tokens == "20M"


def test_kept_softmax_layers_follow_the_model(quality_run, corpus, tmp_path):
    """abl-two-softmax keeps layers 0 and 15: every other layer of *this* model is converted."""
    config = quality_run.job_config("abl-two-softmax", "smollm2", corpus, tmp_path)
    assert config.layers == [i for i in range(30) if i not in (0, 15)]  # SmolLM2-135M: 30 layers
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for count in (20, 8):
        (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": count}))
        if count > 15:
            config = quality_run.job_config("abl-two-softmax", str(model_dir), corpus, tmp_path)
            assert config.layers == [i for i in range(count) if i not in (0, 15)]
        else:
            with pytest.raises(ValueError, match="has 8 layers"):
                quality_run.job_config("abl-two-softmax", str(model_dir), corpus, tmp_path)


def test_recipe_job_out_of_step_with_its_file_is_refused(quality_run, corpus, tmp_path, monkeypatch):
    description, _, layers, budget, extra = quality_run.JOBS["hybrid-w128-20m"]
    monkeypatch.setitem(quality_run.JOBS, "hybrid-w128-20m", (description, {"window": 64}, layers, budget, extra))
    with pytest.raises(ValueError, match="out of step"):
        quality_run.job_config("hybrid-w128-20m", "m", corpus, tmp_path)
    with pytest.raises(ValueError, match="unknown job"):
        quality_run.job_config("no-such-job", "m", corpus, tmp_path)


def _fake_result(name, ratio, tokens):
    curve = [{"tokens": t, "eval_pydoc_ppl": 10.0 * ratio * (2 if t == 1_000_000 else 1), "eval_austen.txt_ppl": 20.0 * ratio}
             for t in (1_000_000, 5_000_000, 20_000_000) if t <= tokens]
    final = {text: {"teacher": base, "student": base * ratio, "ratio": ratio} for text, base in (("pydoc", 10.0),
                                                                                                 ("austen", 20.0))}
    return {"job": name, "description": f"fake {name}", "settings": {}, "layers": None, "tokens": tokens,
            "final": final, "curve": curve, "train_tokens_per_s": 1000.0, "device": "cpu", "torch": "x",
            "date": "2026-11-22", "command": "c"}


def test_report_tables_curves_and_ablation(quality_run, tmp_path):
    runs = tmp_path / "runs"
    for name, ratio, tokens in (("hybrid-w128-20m", 1.05, 20_000_000), ("abl-elu", 20.0, 1_000_000),
                                ("abl-performer", 12.0, 1_000_000)):
        (runs / name).mkdir(parents=True)
        (runs / name / "result.json").write_text(json.dumps(_fake_result(name, ratio, tokens)))
    (runs / "teacher_block_eval.json").write_text(json.dumps({"protocol": "p", "pydoc": 10.0, "austen": 20.0}))
    out = tmp_path / "docs" / "results.md"
    text = quality_run.write_report(runs, out)
    assert text.index("| hybrid-w128-20m |") < text.index("| abl-elu |")  # the long runs come first
    assert "| 20.0M | 10.50 (1.050x) | 21.00 (1.050x) |" in text  # the curve against the teacher's blocks
    ablation = text[text.index("## Ablation"):]
    assert ablation.index("| abl-performer |") < ablation.index("| abl-elu |")  # sorted, best first
    assert "`python scripts/quality_run.py --job abl-elu --model smollm2" in ablation
    for png in ("results_curves.png", "results_ablation.png"):
        assert (out.parent / png).stat().st_size > 1000


@pytest.mark.parametrize("shipped, measured", [("smollm2-135m.yaml", "transform-8k-sinks-20m.yaml"),
                                               ("smollm2-135m-layer-hybrid.yaml", "layer-hybrid-8k-sinks-ppl.yaml")])
def test_the_shipped_recipes_are_the_measured_long_context_runs(shipped, measured):
    """The top-level recipes are the runs docs/results.md measured (all but where they write)."""
    from dijiang.train import load_recipe

    ours = load_recipe(ROOT / "recipes" / shipped)
    run = load_recipe(ROOT / "recipes" / "long-context" / measured)
    assert {k: v for k, v in ours.items() if k != "out"} == {k: v for k, v in run.items() if k != "out"}