"""`dijiang bench` and benchmarks/bench_model.py on a tiny random model, CPU, seconds: the tables are printed, the
JSON, the report and the plot are written."""
import json

import pytest
from script_loader import load_script

from dijiang import cli

main = load_script("benchmarks/bench_model.py").main

ARGS = ["--model", "tiny", "--contexts", "16,32", "--batches", "1,2", "--batch-contexts", "16", "--new-tokens", "4",
        "--hf-new-tokens", "3", "--train-contexts", "16", "--train-tokens", "32", "--repeats", "1"]


def test_bench_writes_table_report_and_plot(tmp_path, capsys):
    out, png, data = tmp_path / "bench.md", tmp_path / "bench.png", tmp_path / "bench.json"
    assert main(ARGS + ["--out", str(out), "--png", str(png), "--json", str(data)]) == 0
    text = out.read_text()
    assert "| model | batch | context | prefill tok/s" in text and "## Training throughput" in text
    for kind in ("teacher", "pure", "window"):
        assert f"| {kind} | 1 | 32 |" in text and f"| {kind} | 2 | 16 |" in text and f"| {kind} | 16 |" in text
    assert "command: `" in text and "torch " in text and "device: CPU" in text
    assert png.exists() and png.stat().st_size > 1000
    rows = json.loads(data.read_text())
    assert len(rows["inference"]) == 9 and len(rows["training"]) == 3
    assert all(r["greedy_match"] == "3/3" for r in rows["inference"] if "greedy_match" in r)
    assert "| teacher |" in capsys.readouterr().out  # the table is printed too
    merged = tmp_path / "merged.md"
    assert main(["--from-json", f"{data},{data}", "--out", str(merged)]) == 0
    assert merged.exists() and (tmp_path / "merged.png").exists()
    other = json.loads(data.read_text())
    other["meta"].update(window=128, command="dijiang bench --window 128")
    (tmp_path / "w128.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="--overwrite"):  # an earlier report is never replaced silently
        main(["--from-json", f"{data},{tmp_path / 'w128.json'}", "--out", str(merged)])
    assert main(["--from-json", f"{data},{tmp_path / 'w128.json'}", "--out", str(merged), "--overwrite"]) == 0
    text = merged.read_text()  # runs with different windows: each window row names its own
    assert f"| window{rows['meta']['window']} | 1 | 32 |" in text and "| window128 | 1 | 32 |" in text
    assert "dijiang bench --window 128" in text


def test_bench_subcommand_prints_the_tables_and_writes_only_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "bench.json"
    argv = ["bench", "--model", "tiny", "--kinds", "teacher,pure", "--contexts", "16", "--batches", "1",
            "--new-tokens", "3", "--hf-new-tokens", "2", "--train-contexts", "16", "--train-tokens", "32",
            "--repeats", "1", "--json", str(data)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "## Inference" in printed and "| pure | 1 | 16 |" in printed and "## Training throughput" in printed
    rows = json.loads(data.read_text())
    assert [r["kind"] for r in rows["inference"]] == ["teacher", "pure"] and len(rows["training"]) == 2
    assert rows["meta"]["command"].startswith("dijiang bench ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no report, no plot
    assert cli.main(argv) == 2  # an earlier JSON is never replaced silently
    assert "--overwrite" in capsys.readouterr().err


def test_recorded_command_names_the_subcommand_once(monkeypatch):
    from dijiang.bench import _command_line

    monkeypatch.setattr("sys.argv", ["python -m dijiang", "bench", "--model", "tiny", "--window", "128"])
    assert _command_line() == "dijiang bench --model tiny --window 128"
    monkeypatch.setattr("sys.argv", ["bench_model.py", "--model", "tiny"])
    assert _command_line() == "dijiang bench --model tiny"


def test_cli_subcommand_is_registered():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    from dijiang.bench import add_cli

    add_cli(sub)
    args = parser.parse_args(["bench", "--model", "tiny"])
    assert args.func is not None and args.contexts[0] == 1024
    assert cli.COMMANDS["bench"][0] == "bench"


def test_each_kind_converts_as_it_says():
    """The kinds a bench run times: their layers' map, window and backend (the Hedgehog kinds against each other)."""
    import torch

    from dijiang.bench import KINDS, build_models
    from dijiang.conversion import iter_dijiang_layers

    models = build_models("tiny", list(KINDS), window=8, device=torch.device("cpu"), dtype=torch.float32)
    assert list(models) == list(KINDS)
    expected = {"pure": ("dijiang", 0, "auto"), "window": ("dijiang", 8, "auto"),
                "window-sinks": ("dijiang", 4, "auto"), "hedgehog": ("hedgehog", 0, "auto"),
                "hedgehog-torch": ("hedgehog", 0, "torch"), "hedgehog-window": ("hedgehog", 8, "auto"),
                "hedgehog-window-torch": ("hedgehog", 8, "torch")}
    for kind, (feature_map, window, backend) in expected.items():
        layers = [layer for _, layer in iter_dijiang_layers(models[kind])]
        assert layers and all((layer.settings.feature_map, layer.settings.window, layer.settings.backend)
                              == (feature_map, window, backend) for layer in layers), kind
    assert all(layer.settings.sinks == 4 and layer.feature_transform is not None
               for _, layer in iter_dijiang_layers(models["window-sinks"]))
    assert not list(iter_dijiang_layers(models["teacher"]))
