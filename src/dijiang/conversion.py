"""Convert a Hugging Face causal LM to DiJiang attention; save the result (``dijiang.loading`` loads models).

A converted model stays an instance of its family's HF class (a registered subclass: ``DiJiangLlamaForCausalLM``
is a ``LlamaForCausalLM``), so ``generate``, peft, accelerate and ``save_pretrained`` keep working. Its config
is the family config plus two fields, ``dijiang`` (the settings) and ``dijiang_layers`` (converted layer
indices), and a ``dijiang_<family>`` model type that ``AutoModelForCausalLM`` maps back to the subclass once
this module is imported (importing it registers every family). A saved folder also carries
``modeling_dijiang.py`` and ``auto_map``, so it loads with ``trust_remote_code=True`` in a process that has
``dijiang`` installed but not imported (see ``dijiang.modeling_dijiang``).
"""
from __future__ import annotations

import importlib
import inspect
import numbers
from pathlib import Path

from torch import nn

from dijiang import hf_compat
from dijiang.adapters import ADAPTERS, adapter_for
from dijiang.attention import DecoderContext, DiJiangAttention, DiJiangSettings
from dijiang.cache import DiJiangCache
from dijiang.hf_compat import PREFIX, family_of
from dijiang.modeling_dijiang import ship_with_saved_models


# --------------------------------------------------------------------------------------------- conversion

def attention_modules(model: nn.Module, adapter) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if adapter.is_attention(module)]


def iter_dijiang_layers(model: nn.Module):
    """Yield (name, module) for every converted attention module."""
    for name, module in model.named_modules():
        if isinstance(module, DiJiangAttention):
            yield name, module


def convert(model: nn.Module, settings: DiJiangSettings | dict | None = None, layers=None) -> nn.Module:
    """Replace softmax attention with DiJiang attention, in place; returns the model.

    layers: indices of the decoder layers to convert (default: all); the others keep softmax attention.
    """
    if not hasattr(model, "config") or not hasattr(model.config, "model_type"):
        raise ValueError("convert expects a Hugging Face PreTrainedModel (something with a .config.model_type)")
    if getattr(model.config, "dijiang_layers", None):
        raise ValueError("this model is already converted (config.dijiang_layers is set)")
    settings = DiJiangSettings.from_any(settings)
    family = family_of(model.config)
    adapter = adapter_for(family)
    found = attention_modules(model, adapter)
    if not found:
        raise ValueError(f"found no {family} attention modules to convert in {type(model).__name__}")
    chosen = _choose_layers(layers, len(found))
    not_converted = sorted(set(settings.full_kv_heads) - chosen)
    if not_converted:
        raise ValueError(f"full_kv_heads names layers {not_converted}, which are not converted (a softmax layer keeps "
                         "every head exact already); the converted layers are "
                         f"{sorted(chosen) if len(chosen) < len(found) else 'all ' + str(len(found))}")
    context = _install_decoder_hooks(model)
    for layer_idx, (name, module) in enumerate(found):
        if layer_idx in chosen:
            parent_name, _, child_name = name.rpartition(".")
            replacement = DiJiangAttention(module, adapter, settings, layer_idx, context)
            setattr(model.get_submodule(parent_name), child_name, replacement)
    _become_dijiang(model, family, settings, sorted(chosen))
    return model


def _choose_layers(layers, num_layers: int) -> set[int]:
    if layers is None:
        return set(range(num_layers))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of layer indices, got {layers!r}")
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: pass None to convert every layer, or the indices to convert")
    not_ints = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if not_ints:  # int(0.7) would silently pick layer 0
        raise ValueError(f"layer indices must be integers, got {not_ints}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {sorted(bad)} out of range: the model has {num_layers} attention layers")
    return {int(i) for i in layers}


def _become_dijiang(model, family: str, settings: DiJiangSettings, chosen: list[int]) -> None:
    config_class, model_class = dijiang_classes(family)
    if type(model) is not model_class:
        if type(model).__name__ not in {c.__name__ for c in _family_causal_lm_classes(family)}:
            raise ValueError(f"cannot convert a {type(model).__name__}: expected a {family} causal LM")
        model.__class__ = model_class
    model.config.__class__ = config_class
    model.config.dijiang = settings.to_dict()
    model.config.dijiang_layers = chosen
    model.config.architectures = [model_class.__name__]


def _family_causal_lm_classes(family: str):
    return [hf_compat.causal_lm_class(family)]


# --------------------------------------------------------------------------------------------- the decoder's call

def _install_decoder_hooks(model) -> DecoderContext:
    """Converted layers need the 2-D padding mask, which HF turns into a 4-D mask before attention sees it.

    Hooks on the base model record it and the cache of each forward, swap an empty generic cache for a
    DiJiangCache, and refuse a call that continues a sequence without its recurrent state."""
    existing = getattr(model, "_dijiang_context", None)
    if existing is not None:
        return existing
    context = DecoderContext()
    base = decoder_stack(model)
    signature = inspect.signature(base.forward)

    def record(module, args, kwargs):
        call = hf_compat.DecoderCall(signature, args, kwargs)
        mask = call.attention_mask
        has_padding = mask is not None and mask.dim() == 2 and not bool(mask.all())
        context.mask = mask.bool() if has_padding else None
        use_cache = call.use_cache
        new_use_cache = None
        if use_cache is None and module.training and call.takes("use_cache"):
            new_use_cache = use_cache = False  # HF would build a generic cache from config.use_cache
        if use_cache is None:
            use_cache = getattr(model.config, "use_cache", False)
        cache = DiJiangCache.for_model(model) if _needs_dijiang_cache(call.cache, use_cache) else None
        context.cache = cache if cache is not None else call.cache
        _refuse_decode_without_state(call, context.cache)
        if cache is None and new_use_cache is None:
            return None
        return call.with_changes(cache=cache, use_cache=new_use_cache)

    def forget_cache(module, args, kwargs, output):
        context.cache = None  # a layer called on its own later (evaluate's layer check) runs without one

    base.register_forward_pre_hook(record, with_kwargs=True)
    base.register_forward_hook(forget_cache, with_kwargs=True, always_call=True)
    model._dijiang_context = context
    return context


def _refuse_decode_without_state(call: hf_compat.DecoderCall, cache) -> None:
    """A 2-D mask longer than the cached tokens plus the query means earlier tokens whose state is missing."""
    mask, query = call.attention_mask, call.query_length
    if mask is None or mask.dim() != 2 or query is None:
        return
    seen = cache.get_seq_length() if cache is not None else 0
    if mask.shape[-1] > seen + query:
        raise hf_compat.DecodeWithoutStateError(
            f"the attention mask covers {mask.shape[-1]} tokens but the call brings {query} and its cache "
            f"holds {seen}: a converted model continues a sequence only from its DiJiangCache (pass the cache "
            "the previous call returned, or run the whole sequence without one)"
        )


def decoder_stack(model) -> nn.Module:
    """The module that owns the list of decoder layers (it builds the masks and the cache)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and any(
            isinstance(sub, DiJiangAttention) or "Attention" in type(sub).__name__ for sub in module[0].modules()
        ):
            return model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    raise ValueError(f"cannot find the decoder layer list of {type(model).__name__}")


def _needs_dijiang_cache(cache, use_cache) -> bool:
    if isinstance(cache, DiJiangCache):
        return False
    if cache is None:
        return bool(use_cache)
    if cache.get_seq_length() == 0:  # generate() made an empty generic cache: ours replaces it
        return True
    raise ValueError(f"a converted model cannot continue from a filled {type(cache).__name__}")


# --------------------------------------------------------------------------------------------- registered classes

_CLASSES: dict[str, tuple[type, type]] = {}


def dijiang_classes(family: str) -> tuple[type, type]:
    """The (config, model) subclasses for a family, created once and registered with the Auto classes."""
    if family in _CLASSES:
        return _CLASSES[family]
    base_config = hf_compat.config_class(family)
    base_model = hf_compat.causal_lm_class(family)
    model_type = PREFIX + family
    stem = base_model.__name__.removesuffix("ForCausalLM")
    config_class = type(f"DiJiang{stem}Config", (base_config,), {"model_type": model_type})

    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        settings, chosen = config.dijiang, config.dijiang_layers
        config.dijiang_layers = []  # convert() refuses already-converted configs
        convert(self, settings, chosen)

    model_class = type(f"DiJiang{stem}ForCausalLM", (base_model,), {"config_class": config_class, "__init__": __init__})
    ship_with_saved_models(config_class, model_class)
    hf_compat.register_causal_lm(model_type, config_class, model_class)
    _CLASSES[family] = (config_class, model_class)
    return _CLASSES[family]


def register_all() -> dict[str, tuple[type, type]]:
    """Register every supported family's classes; returns {family: (config class, model class)}. A release
    without a family has nothing to register for it."""
    return {family: dijiang_classes(family) for family in ADAPTERS if hf_compat.config_class(family) is not None}


# AutoModelForCausalLM.from_pretrained(dir) resolves a saved model's dijiang_<family> type once this module is imported.
register_all()

# dijiang.loading's public names, importable from this module too; resolved on use, because dijiang.loading
# imports this module (for the registration above)
_FROM_LOADING = ("EMBEDDED_MODELS", "embedded_gguf", "detach_gguf_quantizer", "load_pretrained", "model_folder",
                 "check_local_path", "non_finite_tensors", "warn_if_non_finite")


def __getattr__(name: str):
    if name in _FROM_LOADING:
        return getattr(importlib.import_module("dijiang.loading"), name)
    raise AttributeError(f"module 'dijiang.conversion' has no attribute {name!r}")


# --------------------------------------------------------------------------------------------- saving

def save_converted(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained into a temporary folder renamed to `out_dir` at the end: a kill leaves the old or the new."""
    from dijiang.files import atomic_dir
    from dijiang.loading import detach_gguf_quantizer

    out = Path(out_dir)
    if getattr(model, "hf_quantizer", None) is not None:
        detach_gguf_quantizer(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


# --------------------------------------------------------------------------------------------- CLI

def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("convert")
    parser.add_argument("--model", default="smollm2", help="embedded name (smollm2), local dir, .gguf or hub name")
    parser.add_argument("--out", required=True, help="output directory (safetensors + config + tokenizer)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")
    add_settings_arguments(parser)
    parser.set_defaults(func=_run_convert_cli)


def add_settings_arguments(parser) -> None:
    from dijiang.arguments import layer_heads, non_empty_int_list, non_negative_int, positive_int
    from dijiang.feature_maps import FEATURE_MAPS

    parser.add_argument("--feature-map", default=None,
                        help=f"kernel feature map of the converted layers: {', '.join(sorted(FEATURE_MAPS))} "
                             "(default dijiang; official with --official)")
    parser.add_argument("--num-features", type=positive_int, default=None,
                        help="features per head (default: head_dim; a multiple of head_dim for the DCT-based maps)")
    parser.add_argument("--stabiliser", default="softmax", choices=["softmax", "norm"],
                        help="softmax: divide by the feature sum (official); norm: ||x||^2/2 (unbiased)")
    parser.add_argument("--window", type=non_negative_int, default=0, help="exact-softmax window (0 = pure DiJiang)")
    parser.add_argument("--sinks", type=non_negative_int, default=0,
                        help="with --window: the first N tokens stay softmax keys of every query (attention sinks)")
    parser.add_argument("--layers", type=non_empty_int_list(non_negative_int), default=None,
                        help="comma-separated layer indices to convert (default all)")
    parser.add_argument("--full-kv-heads", type=layer_heads, default=None, metavar="LAYER:HEAD,...",
                        help="a head hybrid: these key/value heads of converted layers keep exact softmax over the "
                             "whole context (e.g. 7:2,17:1,18:2; scripts/probe_layer_choice.py --compare-kv-heads)")
    parser.add_argument("--official", action="store_true",
                        help="the official layer: its feature map, GroupNorm + gate, no denominator")


def settings_from_args(args) -> tuple[DiJiangSettings, list[int] | None]:
    overrides = dict(num_features=args.num_features, stabiliser=args.stabiliser, window=args.window, sinks=args.sinks)
    if args.feature_map is not None:
        overrides["feature_map"] = args.feature_map
    if args.full_kv_heads:
        overrides["full_kv_heads"] = args.full_kv_heads
    settings = DiJiangSettings.official(**overrides) if args.official else DiJiangSettings(**overrides)
    return settings, args.layers


def _run_convert_cli(args) -> int:
    from dijiang.files import refuse_to_replace, same_path
    from dijiang.loading import load_pretrained

    settings, layers = settings_from_args(args)
    if Path(str(args.model)).expanduser().exists() and same_path(args.model, args.out):
        raise ValueError(f"--out {args.out} is the source model: converting in place would replace it")
    refuse_to_replace(args.out, args.overwrite, "--out")
    model, tokenizer = load_pretrained(args.model)
    convert(model, settings, layers)
    out = save_converted(model, tokenizer, args.out)
    print(f"converted {len(model.config.dijiang_layers)} layers of {args.model} -> {out}")
    return 0
