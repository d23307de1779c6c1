"""scripts/long_context_report.py: the tables and plots of docs/results.md from eval JSONs and training logs."""
import json
import lzma

import pytest
from script_loader import load_script

report = load_script("scripts/long_context_report.py")


def _eval(job: str, hybrid: bool) -> dict:
    rows = []
    for text in ("pydoc", "austen-pride-and-prejudice.txt", "python-stdlib.txt"):
        for window, teacher in ((512, 10.0), (2048, 8.0), (8192, 7.0)):
            rows.append({"text": text, "window": window, "model": "teacher", "perplexity": teacher, "ratio": 1.0})
            rows.append({"text": text, "window": window, "model": job, "perplexity": teacher * 1.2, "ratio": 1.2})
            if hybrid:
                rows.append({"text": text, "window": window, "model": f"{job}, branch off", "ratio": 1.32,
                             "perplexity": teacher * 1.32, "branch_worth": 0.1})
    accuracy = [{"context": n, "trials": 10, "accuracy": a} for n, a in ((1024, 1.0), (2048, 0.5), (4096, 0.0), (8192, 0.0))]
    return {"context": rows, "passkey": {"teacher": accuracy, job: accuracy}}


def _run(root, job, hybrid, nested=False, compressed=False):
    folder = root / job
    (folder / "eval" if nested else folder).mkdir(parents=True)
    (folder / ("eval/eval.json" if nested else "eval.json")).write_text(json.dumps(_eval(job, hybrid)))
    gates = {"slowest_gamma_min": 0.999, "slowest_gamma_max": 0.9995, **({"mix_min": 0.1, "mix_mean": 0.2,
                                                                           "mix_max": 0.3} if hybrid else {})}
    log = [{"step": 1, "tokens": 16, "loss": 2.0}, {"step": 2, "tokens": 32, "loss": 1.0, "eval_pydoc_ppl": 12.0, **gates}]
    text = "\n".join(json.dumps(r) for r in log) + "\n"
    if compressed:  # as docs/bench_data keeps the logs
        (folder / "log.jsonl.xz").write_bytes(lzma.compress(text.encode()))
    else:
        (folder / "log.jsonl").write_text(text)


def test_tables_and_plots(tmp_path, capsys):
    _run(tmp_path, "pure", hybrid=False)
    _run(tmp_path, "baseline", hybrid=True, nested=True)  # the GPU driver's layout
    _run(tmp_path, "stopped", hybrid=True, compressed=True)
    (tmp_path / "stopped" / "eval.json").unlink()  # a run cut before its evaluation: a training curve only
    runs = report.load_runs(tmp_path)
    assert list(runs) == ["baseline", "pure", "stopped"]  # lever order, not alphabetical
    assert runs["stopped"]["log"][-1]["eval_pydoc_ppl"] == 12.0  # read from log.jsonl.xz
    assert runs["stopped"]["eval"] is None and "stopped" not in {r["run"] for r in report.quality_table(runs)}
    rows = {r["run"]: r for r in report.quality_table(runs)}
    assert rows["baseline"]["pydoc"] == "1.200 / 1.200 / 1.200"
    assert rows["baseline"]["Austen off"] == "+10.0 %" and rows["pure"]["code off"] == "-"
    assert rows["pure"]["passkey"] == "1k 100 / 2k 50 / 4k 0 / 8k 0"
    assert report.teacher_table(runs)[0]["pydoc"] == "10.00 / 8.00 / 7.00"
    gates = {r["run"]: r for r in report.gate_table(runs)}
    assert gates["baseline"]["mix"] == "0.100 / 0.200 / 0.300" and gates["pure"]["mix"] == "-"
    assert report.main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    for name in ("long_context.png", "long_context_training.png", "long_context_pure.png",
                 "long_context_pure_training.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| baseline |" in capsys.readouterr().out
    assert report.main([str(tmp_path), "--out", str(tmp_path / "some"), "--plot", "baseline"]) == 0
    assert (tmp_path / "some" / "long_context.png").stat().st_size > 1000
    assert "| pure |" in capsys.readouterr().out  # the tables list every run whatever --plot says
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--plot", "baseline,nonesuch"])
    assert "no such run nonesuch" in capsys.readouterr().err


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no JOB/eval.json"):
        report.load_runs(tmp_path)


def test_map_runs_past_window_and_retrieval_tables(tmp_path, capsys):
    _run(tmp_path, "layer-hybrid", hybrid=True)
    _run(tmp_path, "map-performer", hybrid=True, nested=True)
    evaluation = json.loads((tmp_path / "layer-hybrid" / "eval.json").read_text())
    for row, far in zip(evaluation["passkey"]["layer-hybrid"], ([50, 300], [200, 900], [3000, 100], [5000, 6000])):
        row.update(correct=[True, True], needle_to_end=far)  # 6 needles past the 128-token window, 2 inside it
    (tmp_path / "layer-hybrid" / "eval.json").write_text(json.dumps(evaluation))
    (tmp_path / "retrieval_teacher.json").write_text(json.dumps({"exact": 5, "questions": 8, "mean_logp": -0.5}))
    (tmp_path / "layer-hybrid" / "retrieval.json").write_text(json.dumps({"exact": 1, "questions": 8, "mean_logp": -2.0}))
    runs = report.load_runs(tmp_path)
    assert [r["run"] for r in report.quality_table(runs)] == ["layer-hybrid"]  # map runs have their own table
    assert [r["run"] for r in report.quality_table(runs, maps=True)] == ["map-performer"]
    assert report.quality_table(runs)[0]["past window"] == "6 / 6"
    evaluation["passkey"]["layer-hybrid"][3]["correct"] = [False, True]
    assert report.past_window_cell(evaluation["passkey"]["layer-hybrid"]) == "5 / 6"
    assert report.past_window_cell([{"context": 1024, "accuracy": 1.0}]) == "-"  # rows without needle distances
    assert report.retrieval_table(tmp_path) == [{"model": "teacher", "exact": "5 / 8", "mean log p": "-0.500"},
                                               {"model": "layer-hybrid", "exact": "1 / 8", "mean log p": "-2.000"}]
    assert report.main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "long_context_maps.png").is_file()
    out = capsys.readouterr().out
    assert "feature-map ablation" in out and "| map-performer |" in out and "| teacher | 5 / 8 |" in out


def test_docs_results_show_every_row_the_report_makes_of_the_stored_runs(capsys):
    """docs/results.md describes the present: each table row the report prints from docs/bench_data/long_context is
    in it verbatim (a new run's rows, or a changed figure, cannot be left out of the doc)."""
    from script_loader import ROOT

    assert report.main([str(ROOT / "docs" / "bench_data" / "long_context")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith(("| run |", "| model |"))]
    doc = (ROOT / "docs" / "results.md").read_text()
    assert len(rows) > 50
    assert [row for row in rows if row not in doc] == []
