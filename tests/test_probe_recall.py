"""scripts/probe_recall.py: its MQAR sequences put every pair farther back than the window, and a short run of
every kind writes its table, JSON and plot (what the kinds learn is in docs/results.md)."""
import argparse
import json

import pytest
import torch

import dijiang
from script_loader import load_script

probe = load_script("scripts/probe_recall.py")


def test_every_answer_is_a_value_whose_pair_is_past_the_window():
    gen = torch.Generator().manual_seed(0)
    pairs, queries, gap, keys, values, filler, window = 4, 3, 20, 10, 7, 5, 16
    ids, answer, values_of_pairs = probe.mqar_batch(3, pairs, queries, gap, keys, values, filler, gen)
    assert ids.shape == (3, 1 + 2 * (pairs + queries) + gap) and int(answer.sum()) == 3 * queries
    for row, mask, given_values in zip(ids, answer, values_of_pairs):
        pair_keys, pair_values = row[1:1 + 2 * pairs:2].tolist(), row[2:2 + 2 * pairs:2].tolist()
        assert pair_values == given_values.tolist()  # what "in set" counts is the layout's values
        assert len(set(pair_keys)) == pairs and all(2 <= k < 2 + keys for k in pair_keys)
        assert all(2 + keys + values <= t < 2 + keys + values + filler for t in row[1 + 2 * pairs:1 + 2 * pairs + gap])
        for position in mask.nonzero().flatten().tolist():
            key, value = row[position].item(), row[position + 1].item()
            source = pair_keys.index(key)
            assert pair_values[source] == value  # the query's answer is its pair's value
            assert position - (1 + 2 * source) > window  # and the pair is out of the window's reach
        asked = row[mask].tolist()
        assert len(set(asked)) == queries  # no key asked twice: a repeat could be copied from inside the window


def test_the_set_level_is_the_mean_chance_among_the_values_not_yet_asked():
    assert probe.set_level(4, 2) == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert probe.set_level(3, 1) == pytest.approx(1 / 3)


def test_in_set_counts_answers_that_are_some_value_of_the_sequence():
    class Echo(torch.nn.Module):  # predicts, after every token, the first pair's value
        def forward(self, ids, use_cache=False):
            logits = torch.zeros(*ids.shape, 20)
            logits.scatter_(-1, ids[:, 2:3].expand(ids.shape).unsqueeze(-1), 1.0)
            return type("Out", (), {"logits": logits})()

    gen = torch.Generator().manual_seed(0)
    data = [probe.mqar_batch(8, 3, 2, 6, 5, 6, 4, gen)]
    got = probe.scores(Echo(), data)
    assert got["in_set"] == 1.0 and 0 < got["accuracy"] < 1  # always a value of the sequence, not always its


def test_a_short_run_of_every_kind_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "recall.json"
    assert probe.main(["--steps", "2", "--eval-every", "1", "--held-out", "4", "--batch", "2", "--pairs", "2",
                       "--gap", "8", "--window", "4", "--hidden", "32", "--heads", "2", "--keys", "6", "--values", "5",
                       "--filler", "3", "--json", str(out), "--png", str(tmp_path / "recall.png")]) == 0
    data = json.loads(out.read_text())
    assert [r["kind"] for r in data["results"]] == list(probe.KINDS)
    assert data["set_level"] == pytest.approx(probe.set_level(2, 1)) and data["chance"] == pytest.approx(1 / 5)
    for r in data["results"]:
        assert len(r["curve"]) == 2 and 0 <= r["accuracy"] <= r["in_set"] <= 1
        assert ("accuracy_branch_off" in r) == (r["kind"] in ("window + additive", "window + delta"))
    assert (tmp_path / "recall.png").stat().st_size > 1000 and "| window + delta |" in capsys.readouterr().out


def test_mix_init_sets_the_window_kinds_branch_weight_only():
    args = argparse.Namespace(seed=0, hidden=32, layers=1, heads=2, window=4, mix_init=1.0)
    window_layer = probe.build("window + delta", args, vocab=12).model.layers[0].self_attn
    weights = torch.nn.functional.softplus(window_layer.window_mix.detach()).tolist()
    assert weights == pytest.approx([1.0, 1.0], rel=1e-5)
    assert probe.build("delta", args, vocab=12).model.layers[0].self_attn.window_mix is None


def ids_at_peak(optimizer) -> dict[float, set[int]]:
    """Which parameters train at which peak learning rate."""
    peaks = {}
    for group in optimizer.param_groups:
        peaks.setdefault(group["peak_lr"], set()).update(id(p) for p in group["params"])
    return peaks


def test_mix_lr_puts_the_branch_weights_in_a_group_of_their_own_and_only_then():
    args = argparse.Namespace(seed=0, hidden=32, layers=2, heads=2, window=4, mix_init=None)
    model = probe.build("window + delta", args, vocab=12)
    optimizer = probe.make_optimizer(model, 1e-3, 3e-2)
    mixes = {id(layer.self_attn.window_mix) for layer in model.model.layers}
    everything = {id(p) for p in model.parameters()}
    assert ids_at_peak(optimizer) == {1e-3: everything - mixes, 3e-2: mixes}
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)  # plain AdamW, as the probe trained
    assert ids_at_peak(probe.make_optimizer(model, 1e-3, None)) == {1e-3: everything}
    no_window = probe.build("delta", args, vocab=12)  # no window_mix: one peak even with mix_lr
    assert set(ids_at_peak(probe.make_optimizer(no_window, 1e-3, 3e-2))) == {1e-3}


def test_mix_lr_moves_the_branch_weights_faster(tmp_path):
    def branch_weight_change(extra):
        out = tmp_path / "recall.json"
        probe.main(["--kinds", "window + delta", "--steps", "3", "--eval-every", "3", "--held-out", "4", "--batch",
                    "2", "--pairs", "2", "--gap", "8", "--window", "4", "--hidden", "32", "--heads", "2", "--keys",
                    "6", "--values", "5", "--filler", "3", "--lr", "1e-3", "--json", str(out), *extra])
        result = json.loads(out.read_text())["results"][0]
        return max(abs(a - b) for a, b in zip(result["branch_weight"], result["branch_weight_init"]))

    assert branch_weight_change(["--mix-lr", "1.0"]) > 10 * branch_weight_change([])


@pytest.mark.parametrize("bad", [["--gap", "4", "--window", "8"], ["--pairs", "9", "--keys", "8"],
                                 ["--pairs", "2", "--queries", "3"],
                                 ["--kinds", "softmax,nope"], ["--steps", "0"], ["--hidden", "30", "--heads", "4"],
                                 ["--mix-init", "0"], ["--mix-lr", "0"]])
def test_bad_settings_are_refused(bad):
    with pytest.raises(SystemExit):
        probe.main(bad)


TINY = ["--eval-every", "1", "--held-out", "4", "--batch", "2", "--pairs", "2", "--gap", "8", "--window", "4",
        "--hidden", "32", "--heads", "2", "--keys", "6", "--values", "5", "--filler", "3"]


def test_distil_converts_the_trained_softmax_model_and_reuses_it_from_the_cache(tmp_path, capsys):
    cache, out = tmp_path / "teacher.pt", tmp_path / "distil.json"
    run = ["--distil", "--kinds", "window,window + delta", "--steps", "2", "--distil-steps", "3",
           "--teacher-cache", str(cache), "--json", str(out), *TINY]
    assert probe.main([*run, "--png", str(tmp_path / "distil.png")]) == 0
    first = json.loads(out.read_text())
    assert [r["kind"] for r in first["results"]] == ["softmax", "window", "window + delta"]
    for student in first["results"][1:]:  # scored from step 0: what conversion alone keeps
        assert [p["step"] for p in student["curve"]] == [0, 1, 2, 3]
    assert "accuracy_branch_off" in first["results"][2] and cache.exists()
    assert "| softmax (teacher) |" in capsys.readouterr().out and (tmp_path / "distil.png").stat().st_size > 1000
    assert probe.main(run) == 0  # the second run reads the teacher: the same teacher result, the same students
    second = json.loads(out.read_text())
    assert second["results"][0] == first["results"][0]
    assert [r["curve"] for r in second["results"][1:]] == [r["curve"] for r in first["results"][1:]]
    with pytest.raises(SystemExit, match="trained with"):  # another task: the cached teacher is not that one
        probe.main([*run, "--pairs", "3"])


def test_distil_kind_leaves_the_teacher_as_it_was():
    args = argparse.Namespace(seed=0, hidden=32, layers=1, heads=2, window=4, mix_init=None, mix_lr=None, lr=1e-3,
                              pretrained_lr=1e-4, distil_steps=2, eval_every=1, batch=2, pairs=2, queries=1, gap=8,
                              keys=6, values=5, filler=3)
    teacher = probe.build("softmax", args, vocab=16)
    before = {name: p.detach().clone() for name, p in teacher.state_dict().items()}
    held_out = [probe.mqar_batch(2, 2, 1, 8, 6, 5, 3, torch.Generator().manual_seed(1))]
    probe.distil_kind("window + delta", teacher, args, held_out)
    assert not list(dijiang.conversion.iter_dijiang_layers(teacher))
    assert all(torch.equal(before[name], p) for name, p in teacher.state_dict().items())


def test_a_converted_model_groups_its_kept_weights_what_conversion_added_and_the_branch_weights():
    args = argparse.Namespace(seed=0, hidden=32, layers=2, heads=2, window=4, mix_init=None)
    student = dijiang.convert(probe.build("softmax", args, vocab=12), probe.kind_settings("window + delta", args))
    layers = [layer for _, layer in dijiang.conversion.iter_dijiang_layers(student)]
    mixes = {id(layer.window_mix) for layer in layers}
    added = {id(p) for layer in layers for p in layer.new_parameters()}
    kept = {id(p) for p in student.parameters()} - added
    assert ids_at_peak(probe.make_optimizer(student, 1e-3, 3e-2, kept_lr=1e-4)) == {
        1e-4: kept, 1e-3: added - mixes, 3e-2: mixes}
    # no --mix-lr: the branch weights train with the rest of what conversion added
    assert ids_at_peak(probe.make_optimizer(student, 1e-3, None, kept_lr=1e-4)) == {1e-4: kept, 1e-3: added}


@pytest.mark.parametrize("bad", [["--distil-steps", "3"], ["--teacher-cache", "t.pt"],
                                 ["--distil", "--kinds", "softmax,window"], ["--distil", "--distil-steps", "0"],
                                 ["--distil", "--pretrained-lr", "0"]])
def test_bad_distil_settings_are_refused(bad):
    with pytest.raises(SystemExit):
        probe.main(bad)
