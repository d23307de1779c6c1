"""scripts/branch_weights.py: each window layer's softplus(window_mix), read from a saved model's safetensors."""
import json

import pytest
import torch
from script_loader import load_script

import dijiang
from dijiang.conversion import save_converted
from helpers import tiny_llama

branch_weights = load_script("scripts/branch_weights.py")


def saved_window_model(tmp_path, layers=None):
    model = tiny_llama(vocab_size=64, layers=3)
    dijiang.convert(model, {"window": 8, "window_mix_init": 0.1}, layers=layers)
    return model, save_converted(model, None, tmp_path / "model")


def test_reads_every_head_of_every_window_layer(tmp_path):
    model, folder = saved_window_model(tmp_path, layers=[0, 2])  # layer 1 stays softmax: no window_mix
    with torch.no_grad():
        model.model.layers[2].self_attn.window_mix[1] = 3.0
    save_converted(model, None, folder)
    weights = branch_weights.read_weights(folder)
    heads = model.config.num_attention_heads
    assert sorted(weights) == [0, 2] and all(len(w) == heads for w in weights.values())
    assert weights[0] == pytest.approx([0.1] * heads, rel=1e-5)
    assert weights[2][1] == pytest.approx(torch.nn.functional.softplus(torch.tensor(3.0)).item(), rel=1e-6)
    summary = branch_weights.summarise(weights)
    assert summary["heads"] == 2 * heads and summary["heads_up"] == 1 and summary["heads_down"] == 0
    assert summary["layers_with_a_head_up"] == [2] and summary["max"] == pytest.approx(3.0486, abs=1e-4)


def test_json_round_trip_and_plot(tmp_path, capsys):
    _, folder = saved_window_model(tmp_path)
    out, png = tmp_path / "w.json", tmp_path / "w.png"
    assert branch_weights.main([f"tiny={folder}", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert list(record["runs"]) == ["tiny"] and sorted(record["runs"]["tiny"]["layers"]) == ["0", "1", "2"]
    # the JSON stands for its runs: the table and a plot without the model
    assert branch_weights.main([str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0
    table = capsys.readouterr().out
    assert table.count("| tiny |") == 2
    assert branch_weights.main([f"renamed={out}"]) == 0  # RUN=FILE.json names the one run it holds
    assert "| renamed | " in capsys.readouterr().out


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="RUN=MODEL_DIR"):
        branch_weights.main(["no-equals-sign"])
    with pytest.raises(SystemExit, match="not a folder"):
        branch_weights.main([f"x={tmp_path / 'missing'}"])
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(SystemExit, match="no 'runs'"):
        branch_weights.main([str(tmp_path / "other.json")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no \\*.safetensors"):
        branch_weights.main([f"x={tmp_path / 'empty'}"])


def test_against_a_probe_ranks_heads_overall_and_within_layers(tmp_path, capsys):
    model, folder = saved_window_model(tmp_path)
    heads = model.config.num_attention_heads
    with torch.no_grad():  # weights that rise with layer and head: the probe's scores rise with them
        for layer, block in enumerate(model.model.layers):
            block.self_attn.window_mix.copy_(torch.arange(heads) * 0.1 + layer - 3.0)
    save_converted(model, None, folder)
    needles = tmp_path / "needles.json"
    needle_mass = [[layer + head / 100 for head in range(heads)] for layer in range(3)]
    needles.write_text(json.dumps({"needle_mass": needle_mass}))
    far = tmp_path / "far.json"  # far mass falling with head inside each layer: within layers rho = -1
    far_mass = [[layer - head / 100 for head in range(heads)] for layer in range(3)]
    far.write_text(json.dumps({"layers": [{"far_mass": row} for row in far_mass]}))
    out = tmp_path / "w.json"
    assert branch_weights.main([f"tiny={folder}", "--against", f"retrieval={needles}", "--against", f"far={far}",
                                "--top", "2", "--json", str(out)]) == 0
    against = json.loads(out.read_text())["against"]["runs"]["tiny"]
    assert against["retrieval"]["spearman"] == pytest.approx(1.0)
    assert against["retrieval"]["spearman_within_layers"] == pytest.approx(1.0)
    assert against["retrieval"]["top_shared"] == 2 and against["retrieval"]["heads"] == 3 * heads
    assert against["far"]["spearman_within_layers"] == pytest.approx(-1.0)
    assert "| tiny | retrieval | " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a JSON of scripts/probe_far_attention.py"):
        branch_weights.main([f"tiny={folder}", "--against", f"x={out}"])
    with pytest.raises(SystemExit):
        branch_weights.main([f"tiny={folder}", "--against", "no-name"])
