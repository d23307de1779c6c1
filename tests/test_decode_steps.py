"""benchmarks/decode_steps.py on the CPU: per-step timings of the fast decode path in three situations."""
import json

from script_loader import ROOT, load_script


def test_per_step_timings_on_cpu(tmp_path, capsys):
    decode_steps = load_script("benchmarks/decode_steps.py")
    out = tmp_path / "steps.json"
    png = tmp_path / "steps.png"
    assert decode_steps.main(["--model", "tiny", "--device", "cpu", "--context", "16", "--steps", "5",
                              "--pause-s", "0", "--json", str(out), "--png", str(png)]) == 0
    assert png.stat().st_size > 1000
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"right after prefill", "second call, no prefill", "after prefill + 0 s idle"}
    for run in data["runs"].values():
        assert len(run["gpu_ms"]) == 5 and all(t > 0 for t in run["gpu_ms"])
        assert run["wall_ms"] >= sum(run["host_ms"]) > 0
    assert data["decode_wall_ms"] > 0
    printed = capsys.readouterr().out
    assert "| right after prefill |" in printed and "decoder.decode(5) after a prefill" in printed


def test_plot_from_an_earlier_run(tmp_path):
    decode_steps = load_script("benchmarks/decode_steps.py")
    png = tmp_path / "again.png"
    assert decode_steps.main(["--from-json", str(ROOT / "docs/bench_data/decode_steps_pure.json"), "--png", str(png)]) == 0
    assert png.stat().st_size > 1000
