"""scripts/probe_layer_choice.py: the banded proxy layer, the needle prompts and the greedy rounds."""
import pytest
import torch
from helpers import tiny_model
from script_loader import load_script
from transformers import AttentionInterface

probe = load_script("scripts/probe_layer_choice.py")


@pytest.fixture()
def banded():
    model = tiny_model("llama")
    model.eval()
    proxy = probe.BandedAttention(window=4)
    AttentionInterface.register("probe_banded_test", proxy)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    model.set_attn_implementation("probe_banded_test")
    return model, proxy, ids, reference


@torch.no_grad()
def test_banded_proxy_keeps_full_layers_and_cuts_the_others(banded):
    model, proxy, ids, reference = banded
    every = list(range(model.config.num_hidden_layers))
    assert torch.allclose(probe.model_keeping(model, proxy, {}, every)(input_ids=ids).logits, reference, atol=1e-5)
    cut = probe.model_keeping(model, proxy, {}, [])(input_ids=ids).logits
    assert torch.allclose(cut[:, :4], reference[:, :4], atol=1e-5)  # inside the window nothing is lost
    assert not torch.allclose(cut[:, 8:], reference[:, 8:], atol=1e-3)
    one = probe.model_keeping(model, proxy, {}, [0])(input_ids=ids).logits
    assert not torch.allclose(one, cut, atol=1e-4) and not torch.allclose(one, reference, atol=1e-4)


def test_retrieval_score_on_teacher_forced_answers(banded):
    model, proxy, _, _ = banded

    class Digits:  # one token per character: enough for needle_prompts
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 for c in text]}

    filler = list(range(97)) * 4
    prompts = probe.answer_prompts(Digits(), filler, count=3, tokens=200)
    assert all(ids.shape == (1, 200) and 0 < start < 200 for ids, start in prompts)
    far = load_script("scripts/probe_far_attention.py")
    for prompt in far.needle_prompts(Digits(), filler, count=3, tokens=200):
        digits = [prompt["ids"][i] for i in prompt["key_span"]]
        assert digits == prompt["ids"][prompt["answer_start"] + 1:]  # the answer (after its space) is the needle's key
    logp, exact = probe.retrieval_score(probe.model_keeping(model, proxy, {}, []), prompts)
    assert logp < 0 and 0.0 <= exact <= 1.0


@torch.no_grad()
def test_banded_proxy_decodes_like_recompute(banded):
    """generate (with a cache) must see the same band as a full forward, or --passkey would measure a bug."""
    model, proxy, ids, _ = banded
    for kept in ([], [1]):
        probe.model_keeping(model, proxy, {}, kept)
        generated = model.generate(input_ids=ids[:, :12], max_new_tokens=6, do_sample=False, pad_token_id=0)
        recomputed = ids[:, :12]
        for _ in range(6):
            next_token = model(input_ids=recomputed, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            recomputed = torch.cat([recomputed, next_token], dim=1)
        assert torch.equal(generated, recomputed), kept


def test_main_adds_and_cuts_layers(tmp_path, monkeypatch):
    import json

    from helpers import save_tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    folder = save_tiny_model(tmp_path / "tiny", tokenizer=tokenizer)
    (tmp_path / "filler.txt").write_text(" ".join(str(i) for i in range(6000)))
    for direction, rounds in (("add", 2), ("cut", 2)):
        out = tmp_path / f"{direction}.json"
        assert probe.main(["--model", str(folder), "--text", str(tmp_path / "filler.txt"), "--tokens", "400",
                           "--prompts", "2", "--keep", str(rounds), "--window", "8", "--direction", direction,
                           "--device", "cpu", "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        kept = [r["kept"] for r in result["rounds"]]
        layers = 2  # the tiny model's
        assert [len(k) for k in kept] == ([1, 2] if direction == "add" else [layers - 1, layers - 2])
        # what `dijiang train --layers` takes: every layer the last round does not keep
        assert result["converted_layers"] == [i for i in range(layers) if i not in kept[-1]]
    out = tmp_path / "compare.json"
    assert probe.main(["--model", str(folder), "--text", str(tmp_path / "filler.txt"), "--tokens", "400",
                       "--prompts", "2", "--keep", "0", "--window", "8", "--compare", "1", "--passkey", "300",
                       "--passkey-trials", "2", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["compared"]) == {"1"} and result["rounds"] == []
    assert [(r["context"], r["trials"]) for r in result["compared_passkey"]["1"]] == [(300, 2)]


@torch.no_grad()
def test_far_perplexity_score_counts_only_the_far_tokens(banded):
    model, proxy, ids, reference = banded
    every = list(range(model.config.num_hidden_layers))
    logp, ppl = probe.far_perplexity_score(probe.model_keeping(model, proxy, {}, every), [ids], far_from=8)
    expected = torch.nn.functional.cross_entropy(reference[0, 7:-1], ids[0, 8:])
    assert logp == pytest.approx(-expected.item(), rel=1e-5) and ppl == pytest.approx(expected.exp().item(), rel=1e-5)
    cut_logp, _ = probe.far_perplexity_score(probe.model_keeping(model, proxy, {}, []), [ids], far_from=8)
    assert cut_logp != pytest.approx(logp, rel=1e-4)  # past the window the cut model sees less


@torch.no_grad()
def test_sinks_stay_visible_to_the_cut_layers(banded):
    model, proxy, ids, reference = banded
    cut = probe.model_keeping(model, proxy, {}, [])(input_ids=ids).logits
    proxy.sinks = 2
    with_sinks = probe.model_keeping(model, proxy, {}, [])(input_ids=ids).logits
    proxy.sinks = 0
    assert torch.allclose(with_sinks[:, :6], reference[:, :6], atol=1e-5)  # window 4 + 2 sinks: all of the first 6
    assert not torch.allclose(with_sinks[:, 8:], cut[:, 8:], atol=1e-4)


@torch.no_grad()
def test_kept_kv_heads_see_everything_and_the_others_their_window(banded):
    model, proxy, ids, reference = banded  # tiny llama: 3 layers, 4 query heads on 2 key/value heads
    layers = model.config.num_hidden_layers
    every_head = {layer: {0, 1} for layer in range(layers)}
    assert torch.allclose(probe.model_keeping(model, proxy, {}, [], every_head)(input_ids=ids).logits, reference,
                          atol=1e-5)
    layer_kept = probe.model_keeping(model, proxy, {}, [1])(input_ids=ids).logits
    heads_kept = probe.model_keeping(model, proxy, {}, [], {1: {0, 1}})(input_ids=ids).logits
    assert torch.allclose(heads_kept, layer_kept, atol=1e-6)  # both heads of layer 1 = layer 1
    half = probe.model_keeping(model, proxy, {}, [], {1: {0}})(input_ids=ids).logits
    cut = probe.model_keeping(model, proxy, {}, [])(input_ids=ids).logits
    assert not torch.allclose(half, layer_kept, atol=1e-4) and not torch.allclose(half, cut, atol=1e-4)
    # decoding with a cache sees the same split as a full forward
    generated = model.generate(input_ids=ids[:, :12], max_new_tokens=6, do_sample=False, pad_token_id=0)
    recomputed = ids[:, :12]
    for _ in range(6):
        next_token = model(input_ids=recomputed, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        recomputed = torch.cat([recomputed, next_token], dim=1)
    assert torch.equal(generated, recomputed)
    # the library's layers: the same split through DiJiangSettings.full_kv_heads
    converted = probe.model_keeping(model, None, {"window": 4}, [], {1: {0}})
    assert converted.model.layers[1].self_attn.full_kv_heads == (0,)
    assert converted.model.layers[0].self_attn.full_kv_heads == ()


def test_top_kv_heads_sum_each_query_group(tmp_path):
    import json

    scores = tmp_path / "needles.json"
    # layer 0: query heads (0.9, 0.0 | 0.1, 0.1); layer 1: (0.3, 0.3 | 0.0, 0.0): groups of two sum to 0.9, 0.2, 0.6, 0
    scores.write_text(json.dumps({"needle_mass": [[0.9, 0.0, 0.1, 0.1], [0.3, 0.3, 0.0, 0.0]]}))
    assert probe.top_kv_heads(str(scores), 1, group=2) == {0: {0}}
    assert probe.top_kv_heads(str(scores), 2, group=2) == {0: {0}, 1: {0}}
    assert probe.top_kv_heads(str(scores), 3, group=2) == {0: {0, 1}, 1: {0}}
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="needle_mass"):
        probe.top_kv_heads(str(tmp_path / "other.json"), 1, group=2)


def test_main_compares_head_hybrids(tmp_path):
    import json

    from helpers import save_tiny_model, tiny_tokenizer

    folder = save_tiny_model(tmp_path / "tiny", tokenizer=tiny_tokenizer())
    (tmp_path / "filler.txt").write_text(" ".join(str(i) for i in range(6000)))
    config = json.loads((folder / "config.json").read_text())
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    scores = tmp_path / "needles.json"
    scores.write_text(json.dumps({"needle_mass": [[float(layer * heads + h) for h in range(heads)]
                                                  for layer in range(layers)]}))
    out = tmp_path / "heads.json"
    common = ["--model", str(folder), "--text", str(tmp_path / "filler.txt"), "--tokens", "400", "--prompts", "2",
              "--keep", "0", "--window", "8", "--device", "cpu"]
    assert probe.main(common + ["--compare-kv-heads", "1,2", "--head-scores", str(scores), "--json", str(out)]) == 0
    compared = json.loads(out.read_text())["compared_kv_heads"]
    group = heads // config.get("num_key_value_heads", heads)
    last = str(layers - 1)
    assert compared["1"]["kv_heads"] == {last: [heads // group - 1]}  # the last layer's last group scores highest
    assert compared["1"]["full_kv_heads"] == f"{last}:{heads // group - 1}"  # what dijiang convert/train take
    assert sum(len(h) for h in compared["2"]["kv_heads"].values()) == 2
    assert all(len(entry["score"]) == 2 for entry in compared.values())
    with pytest.raises(SystemExit):
        probe.main(common + ["--compare-kv-heads", "2"])  # without --head-scores
    named = tmp_path / "named.json"
    assert probe.main(common + ["--compare-heads", "0:1,1:0", "--json", str(named)]) == 0
    entry = json.loads(named.read_text())["compared_kv_heads"]["0:1,1:0"]
    assert entry["kv_heads"] == {"0": [1], "1": [0]} and entry["full_kv_heads"] == "0:1,1:0"
    for bad in ("0:9", "9:0", "0-1"):
        with pytest.raises(SystemExit):
            probe.main(common + ["--compare-heads", bad])


def test_main_adds_key_value_heads_greedily(tmp_path):
    import json

    from helpers import save_tiny_model, tiny_tokenizer

    folder = save_tiny_model(tmp_path / "tiny", tokenizer=tiny_tokenizer())
    (tmp_path / "filler.txt").write_text(" ".join(str(i) for i in range(6000)))
    out = tmp_path / "heads.json"
    assert probe.main(["--model", str(folder), "--text", str(tmp_path / "filler.txt"), "--tokens", "400",
                       "--prompts", "2", "--keep", "2", "--shortlist", "3", "--unit", "kv-head", "--window", "8",
                       "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    config = json.loads((folder / "config.json").read_text())
    units = config["num_hidden_layers"] * config["num_key_value_heads"]
    first, second = result["rounds"]
    assert len(first["candidates"]) == units and len(second["candidates"]) == 2  # the shortlist's 3, less the kept
    assert len(second["kept"]) == 2 and first["kept"][0] in second["kept"]
    layer, head = map(int, first["kept"][0].split(":"))
    assert 0 <= layer < config["num_hidden_layers"] and 0 <= head < config["num_key_value_heads"]
    assert result["full_kv_heads"] == ",".join(sorted(second["kept"]))
    assert "converted_layers" not in result
