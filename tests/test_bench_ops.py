"""benchmarks/bench_ops.py at CPU sizes: every method runs (window hybrid included) and the report is written."""
import json

import pytest
import torch
from script_loader import load_script


@pytest.fixture(scope="module")
def bench_ops():
    return load_script("benchmarks/bench_ops.py")


def test_all_methods_on_cpu_write_table_and_plot(bench_ops, tmp_path):
    md, png, data = tmp_path / "ops.md", tmp_path / "ops.png", tmp_path / "ops.json"
    rows = bench_ops.main(["--device", "cpu", "--shapes", "2x16", "--lengths", "64,128", "--window", "16",
                           "--md", str(md), "--png", str(png), "--json", str(data)])
    assert [r["T"] for r in rows] == [64, 128]
    for row in rows:
        for method in bench_ops.METHODS:
            fwd, fwd_bwd = row[method]
            assert fwd > 0 and fwd_bwd > 0, method
    text = md.read_text()
    assert "window-16 hybrid (torch chunk + map) fwd / fwd+bwd" in text and "| 2 x 16 | 128 |" in text
    assert png.stat().st_size > 1000 and len(json.loads(data.read_text())) == 2


def test_without_md_only_the_table_is_printed(bench_ops, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    docs = sorted(bench_ops.ROOT.joinpath("docs").glob("bench_ops*"))
    before = [p.stat().st_mtime_ns for p in docs]
    bench_ops.main(["--device", "cpu", "--shapes", "2x16", "--lengths", "64", "--methods", "sdpa,torch"])
    assert "| 2 x 16 | 64 |" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in docs] == before and not any(tmp_path.iterdir())


def test_window_method_computes_the_window_hybrid(bench_ops):
    from dijiang.ops.window import window_attention

    q, k, v, proj, lw, ld = bench_ops.make(1, 48, 2, 16, 16, torch.float32, "cpu")
    fn, _ = bench_ops.build("window", q, k, v, proj, lw, ld, 0.25, window=8)
    fq = bench_ops.tdj.dijiang_feature_map(q, proj, lw, 0.25)
    fk = bench_ops.tdj.dijiang_feature_map(k, proj, lw, 0.25)
    reference, _ = window_attention(q, k, v, fq, fk, ld, torch.ones_like(ld), window=8, scale=0.25, mode="parallel")
    torch.testing.assert_close(fn(), reference, rtol=1e-4, atol=1e-5)
    fn, _ = bench_ops.build("window-sinks", q, k, v, proj, lw, ld, 0.25, window=8)  # 4 window keys + 4 sinks
    reference, _ = window_attention(q, k, v, fq, fk, ld, torch.ones_like(ld), window=4, scale=0.25, mode="parallel",
                                    sinks=4)
    torch.testing.assert_close(fn(), reference, rtol=1e-4, atol=1e-5)


def test_unknown_method_is_refused(bench_ops, tmp_path):
    with pytest.raises(SystemExit):
        bench_ops.main(["--device", "cpu", "--methods", "sdpa,nope", "--no-write"])


def test_cuda_graphs_mode_refuses_cpu(bench_ops):
    with pytest.raises(SystemExit):
        bench_ops.main(["--device", "cpu", "--cuda-graphs", "--no-write"])


def test_op_of_tensors_is_the_built_op(bench_ops):
    """--cuda-graphs captures op_of_tensors(...); it must compute what build() times."""
    q, k, v, proj, lw, ld = bench_ops.make(1, 40, 2, 16, 16, torch.float32, "cpu")
    for method in ("fused", "window-fused", "window-sinks"):
        fn, _ = bench_ops.build(method, q, k, v, proj, lw, ld, 0.25, window=8)
        op = bench_ops.op_of_tensors(method, proj, 0.25, 8)
        assert torch.equal(op(q, k, v, lw, ld), fn())
