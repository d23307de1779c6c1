"""benchmarks/bench_cache_memory.py: a layer hybrid's cache holds softmax KV for its kept layers only."""
import json

import pytest
from helpers import save_tiny_model
from script_loader import load_script

bench = load_script("benchmarks/bench_cache_memory.py")


def test_cache_grows_only_with_the_softmax_layers(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")  # 2 layers
    assert bench.main(["--model", str(model), "--contexts", "16,32", "--window", "8", "--dtype", "float32",
                       "--kept", "all window=", "--kept", "one softmax=1", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "cache_memory.json").read_text())["rows"]
    mib = {(r["model"], r["context"]): r["MiB"] for r in rows}
    teacher_slope = mib["teacher", 32] - mib["teacher", 16]
    assert mib["teacher", 32] == pytest.approx(2 * mib["teacher", 16])  # KV: linear in the context
    assert mib["all window", 32] == mib["all window", 16]  # constant
    assert mib["one softmax", 32] - mib["one softmax", 16] == pytest.approx(teacher_slope / 2)  # KV of 1 of 2 layers
    assert (tmp_path / "out" / "cache_memory.png").is_file() and "| one softmax |" in capsys.readouterr().out


def test_layers_the_model_lacks_are_refused(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    with pytest.raises(SystemExit, match="do not all exist"):
        bench.main(["--model", str(model), "--contexts", "8", "--kept", "bad=5"])


def test_a_recipe_converts_as_its_recipe_does(tmp_path):
    """--recipe: the model converted by a recipe's attention settings; a window + delta layer holds the window and
    the delta state, no empty linear state of the window op beside them, so less than the additive layer."""
    model = save_tiny_model(tmp_path / "model")
    recipes = {}
    for name, extra in (("additive", ""), ("delta", "  state_update: delta\n  state_decay: false\n")):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(f"model: smollm2\nattention:\n  window: 6\n  sinks: 2\n{extra}")
    assert bench.main(["--model", str(model), "--contexts", "16,32", "--dtype", "float32", "--out", str(tmp_path / "out"),
                       *(f"--recipe={n}={p}" for n, p in recipes.items())]) == 0
    rows = json.loads((tmp_path / "out" / "cache_memory.json").read_text())["rows"]
    mib = {(r["model"], r["context"]): r["MiB"] for r in rows}
    assert {m for m, _ in mib} == {"teacher", "additive", "delta"}
    assert mib["delta", 32] == mib["delta", 16] and mib["additive", 32] == mib["additive", 16]
    assert mib["delta", 32] < mib["additive", 32]


def test_a_missing_recipe_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--model", "smollm2", "--contexts", "8", "--recipe", f"x={tmp_path / 'none.yaml'}"])
