"""A saved DiJiang folder is a Hugging Face model: it loads in a fresh process that has not imported dijiang.

Also the dequantised-GGUF cache of `load_pretrained` (a stand-in loader: no real GGUF file needed).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model

import dijiang
from dijiang import conversion, loading

SRC = Path(dijiang.__file__).resolve().parent.parent

FRESH_PROCESS_CHECKS = """
import sys, torch
from transformers import AutoModelForCausalLM, pipeline
folder, expected = sys.argv[1], torch.load(sys.argv[2])
try:
    AutoModelForCausalLM.from_pretrained(folder)
    raise SystemExit("loaded without trust_remote_code: transformers must have been told about dijiang somehow")
except ValueError as error:
    assert "trust_remote_code=True" in str(error), error
assert "dijiang" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__name__ == "DiJiangLlamaForCausalLM", type(model)
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"])
generator = pipeline("text-generation", model=folder, trust_remote_code=True)
out = generator(expected["prompt"], max_new_tokens=6, do_sample=False, return_full_text=False)
assert out[0]["generated_text"] == expected["continuation"], (out, expected["continuation"])
print("fresh process: ok")
"""


def fresh_process_env(tmp_path) -> dict:
    """dijiang importable (not imported), transformers' copies of remote code kept inside tmp_path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    tiny = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    model, tokenizer = dijiang.load_pretrained(str(tiny))
    dijiang.convert(model, {"window": 4}, layers=[0, 1])
    out = tmp_path_factory.mktemp("saved") / "tiny-dijiang"
    conversion.save_converted(model.eval(), tokenizer, out)
    return out, model, tokenizer


def test_saved_folder_carries_its_loading_code(converted_dir):
    folder, _, _ = converted_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_dijiang.DiJiangLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_dijiang.DiJiangLlamaForCausalLM"}
    assert (folder / "modeling_dijiang.py").read_text() == Path(conversion.__file__).with_name(
        "modeling_dijiang.py").read_text()


def test_loads_in_a_process_that_never_imported_dijiang(converted_dir, tmp_path):
    folder, model, tokenizer = converted_dir
    prompt = "The cat"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    continuation = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    expected = tmp_path / "expected.pt"
    torch.save({"ids": ids, "logits": logits, "prompt": prompt, "continuation": continuation}, expected)
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECKS, str(folder), str(expected)],
                            env=fresh_process_env(tmp_path), capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fresh process: ok" in result.stdout


def test_classes_pickle_by_name(converted_dir):
    import pickle

    _, model, _ = converted_dir
    config = pickle.loads(pickle.dumps(model.config))
    assert type(config) is type(model.config) and config.dijiang_layers == [0, 1]


def test_gguf_is_dequantised_once_per_file_version(tmp_path, monkeypatch):
    tiny = save_tiny_model(tmp_path / "tiny")
    calls = []

    def dequantise(folder, gguf, kwargs):  # stands in for transformers' GGUF loader
        calls.append(Path(folder) / gguf)
        return dijiang.load_pretrained(str(tiny))

    monkeypatch.setenv("DIJIANG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_load_gguf", dequantise)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"version 1")
    first, _ = dijiang.load_pretrained(str(gguf))
    again, _ = dijiang.load_pretrained(str(gguf))
    assert len(calls) == 1
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    gguf.write_bytes(b"version 2, a different size")
    dijiang.load_pretrained(str(gguf))
    assert len(calls) == 2
    copies = sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir())
    assert len(copies) == 2 and all(name.startswith("model-") for name in copies)


def test_loading_names_stay_importable_from_conversion():
    from dijiang.conversion import load_pretrained, model_folder

    assert load_pretrained is loading.load_pretrained is dijiang.load_pretrained
    assert model_folder is loading.model_folder
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        conversion.no_such_name
