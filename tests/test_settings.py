"""dijiang.settings: an environment variable set after import takes effect on the next call."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer

from dijiang import loading, settings
from dijiang.fast_decode import FastDecoder


def test_defaults(monkeypatch):
    for name in ("DIJIANG_CACHE", "DIJIANG_TRITON_DIRECT_LAUNCH", "DIJIANG_INLINE_CARRY", "DIJIANG_COMPILE_MODE",
                 "DIJIANG_COMPILE_SCOPE", "DIJIANG_WINDOW_DECODE_KERNEL", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    assert settings.cache_dir() == Path.home() / ".cache" / "dijiang"
    assert settings.triton_direct_launch() is True and settings.inline_carry() is None
    assert settings.compile_mode() == "max-autotune-no-cudagraphs" and settings.compile_scope() == "layer"
    assert settings.window_decode_kernel() == "1" and settings.accelerate_use_fsdp() is False
    monkeypatch.setenv("DIJIANG_COMPILE_MODE", "")
    assert settings.compile_mode() is None  # empty: torch.compile's own default
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "TRUE")
    assert settings.accelerate_use_fsdp() is True


def test_gguf_cache_follows_dijiang_cache_set_after_import(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(loading, "_load_gguf", lambda folder, gguf, kwargs: (tiny_llama(len(tokenizer)), tokenizer))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights")
    for cache in ("first", "second"):
        monkeypatch.setenv("DIJIANG_CACHE", str(tmp_path / cache))
        folder = Path(loading.model_folder(str(gguf)))
        assert folder.parent == tmp_path / cache / "gguf" and (folder / "config.json").exists()


def test_inline_carry_switch_set_after_import(monkeypatch):
    tdj = pytest.importorskip("dijiang.ops.triton_dijiang")
    meta = torch.empty(1, 1000, 2, 64, device="meta")
    proj = torch.empty(64, 64, device="meta")

    def inline() -> bool:
        return tdj._cfg_for(meta, meta, proj, 0.125, 1e-6, False, 64, True).inline

    monkeypatch.delenv("DIJIANG_INLINE_CARRY", raising=False)
    assert inline()  # 16 chunks x 2 heads: short enough for the in-kernel carry
    monkeypatch.setenv("DIJIANG_INLINE_CARRY", "0")
    assert not inline()
    monkeypatch.setenv("DIJIANG_INLINE_CARRY", "1")
    assert inline()


def test_bad_compile_scope_is_refused_when_a_decoder_is_built(monkeypatch):
    import dijiang
    from helpers import tiny_model

    model = dijiang.convert(tiny_model("llama"))
    monkeypatch.setenv("DIJIANG_COMPILE_SCOPE", "everything")
    with pytest.raises(ValueError, match="DIJIANG_COMPILE_SCOPE must be 'layer' or 'step'"):
        FastDecoder(model, batch_size=1, capacity=8)
