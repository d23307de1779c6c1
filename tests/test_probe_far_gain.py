"""scripts/probe_far_gain.py: which tokens are copyable from beyond the window, and the split of the gain."""
import json

import torch
from script_loader import load_script

probe = load_script("scripts/probe_far_gain.py")


def test_copyable_from_afar_needs_the_latest_earlier_occurrence_outside_the_window():
    #        0  1  2  3  4  5  6  7  8  9
    ids = [5, 6, 7, 1, 2, 3, 4, 5, 6, 7]
    # the 3-gram (5, 6, 7) ends at 2 and again at 9: 9 - 2 = 7 back
    assert probe.copyable_from_afar(ids, 3, window=6) == [False] * 9 + [True]
    assert probe.copyable_from_afar(ids, 3, window=7) == [False] * 10  # p = 2 is key 9 - 7 = 2: inside
    # a nearer repeat inside the window makes the far one irrelevant
    ids = [5, 6, 1, 2, 3, 5, 6, 9, 5, 6]
    assert probe.copyable_from_afar(ids, 2, window=3) == [False] * 6 + [True, False, False, False]


def test_split_gain_sums_to_the_whole():
    full = torch.tensor([1.0, 1.0, 2.0, 2.0])
    banded = torch.tensor([3.0, 1.5, 2.0, 2.5])
    row = probe.split_gain(full, banded, torch.tensor([True, False, False, True]))
    assert row["copyable_share"] == 0.5
    assert row["mean_gain_copyable"] == (2.0 + 0.5) / 2 and row["mean_gain_other"] == 0.5 / 2
    assert abs(row["gain_share_copyable"] - 2.5 / 3.0) < 1e-12


def test_main_on_a_tiny_model(tmp_path, capsys):
    from helpers import save_tiny_model, tiny_tokenizer

    folder = save_tiny_model(tmp_path / "tiny", tokenizer=tiny_tokenizer())
    text = tmp_path / "text.txt"
    text.write_text(" ".join(str(i % 37) for i in range(3000)))  # repeats every 37 numbers
    out = tmp_path / "gain.json"
    assert probe.main(["--model", str(folder), "--text", str(text), "--tokens", "256", "--windows", "2",
                       "--window", "16", "--sinks", "2", "--far-from", "64", "--device", "cpu",
                       "--json", str(out)]) == 0
    row = json.loads(out.read_text())["texts"][str(text)]
    assert row["tokens"] == 2 * (256 - 64) and 0 < row["copyable_share"] <= 1
    assert "| text.txt |" in capsys.readouterr().out
