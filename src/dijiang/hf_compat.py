"""Every place dijiang reaches into transformers' internals, and the releases each one handles.

Tested on transformers 5.13 through 5.25 (pyproject.toml's bounds; constraints.txt pins the release the suite was
last green on). When a release renames something, this is the one file to change; tests/test_hf_compat.py fails
first if the installed release passes the cache under a name this module does not know.

- The generation cache argument of ``forward``: ``past_key_values`` up to 5.23; ``cache`` from 5.24
  (``past_key_values`` still accepted there with a FutureWarning, to be removed in 5.40); GPT-NeoX's decoder
  layers hand it to attention as ``layer_past``. We find the cache in a call by its type (a ``Cache`` instance),
  whatever its name, and pass one in under the name the callee's signature declares.
- The cache field of model outputs: ``.past_key_values`` up to 5.23, ``.cache`` from 5.24.
- The cache classes ``dijiang.cache`` builds on: ``cache_utils.Cache``, ``CacheLayerMixin`` and ``DynamicLayer``
  (the per-layer cache API; 5.0-5.10 also declared ``get_max_cache_shape`` abstract, and 5.12 fails conversion:
  hence the 5.13 floor. 5.13-5.25 pass ``get_mask_sizes`` the query length; older ones passed ``cache_position``).
- RoPE: ``transformers.models.<module>.modeling_<module>.apply_rotary_pos_emb``; the module name is the
  model type except for Gemma 3 text (``gemma3``).
- Class registration: ``CONFIG_MAPPING``, ``MODEL_FOR_CAUSAL_LM_MAPPING``, ``AutoConfig.register`` and
  ``AutoModelForCausalLM.register``.
- Family detection: ``config.model_type`` (a converted model's is ``dijiang_<family>``).
"""
from __future__ import annotations

import importlib
import inspect

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

__all__ = ["Cache", "CacheLayerMixin", "DynamicLayer", "CACHE_ARGUMENT_NAMES", "DecodeWithoutStateError",
           "find_cache", "output_cache", "cache_keyword", "without_cache", "DecoderCall", "rotary_function",
           "family_of", "config_class", "causal_lm_class", "register_causal_lm", "mask_query_length", "PREFIX"]

# names a decoder stack's forward takes the cache under, newest first (5.24: cache; <= 5.23: past_key_values)
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")
# the same for output fields (a ModelOutput of 5.24 still answers .past_key_values, with a deprecation warning)
OUTPUT_CACHE_NAMES = ("cache", "past_key_values")
# model types whose modeling module has another name
_MODELING_MODULE = {"gemma3_text": "gemma3"}
PREFIX = "dijiang_"  # a converted model's model_type is PREFIX + its family's


class DecodeWithoutStateError(RuntimeError):
    """A converted layer was asked to continue a sequence, but the recurrent state of what came before is missing."""


# --------------------------------------------------------------------------------------------- the cache

def find_cache(args, kwargs) -> Cache | None:
    """The Cache instance among a call's arguments, whatever keyword (or position) it came under."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def output_cache(out) -> Cache | None:
    """The cache a model returned (``out.cache`` from 5.24, ``out.past_key_values`` before)."""
    for name in OUTPUT_CACHE_NAMES:
        if name in out.keys():  # not getattr: 5.24's .past_key_values property warns
            return out[name]
    return None


def cache_keyword(fn) -> str:
    """The keyword a model's (or module's) forward takes the cache under."""
    parameters = inspect.signature(fn).parameters
    for name in CACHE_ARGUMENT_NAMES:
        if name in parameters:
            return name
    raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes none of {CACHE_ARGUMENT_NAMES}; "
                    "dijiang.hf_compat does not know how this transformers release passes the cache")


def without_cache(kwargs: dict) -> dict:
    """A call's keyword arguments minus the cache (under any of its names), to replay a layer without one."""
    names = {*CACHE_ARGUMENT_NAMES, "layer_past", "past_key_value"}
    return {k: v for k, v in kwargs.items() if k not in names and not isinstance(v, Cache)}


def mask_query_length(query) -> int:
    """Cache layers' get_mask_sizes get the query length (5.13-5.24); older releases passed cache_position."""
    return query.shape[0] if isinstance(query, torch.Tensor) else int(query)


class DecoderCall:
    """One call of a decoder stack's forward (LlamaModel, GPTNeoXModel, OPTDecoder ...), read by meaning."""

    def __init__(self, signature: inspect.Signature, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        var_kwargs = [n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
        self.arguments = dict(bound.arguments)
        for name in var_kwargs:
            self.arguments.update(self.arguments.pop(name, {}))
        self.parameters = signature.parameters
        self.cache_name = self._cache_name()

    def _cache_name(self) -> str | None:
        for name, value in self.arguments.items():
            if isinstance(value, Cache):
                return name
        for name in CACHE_ARGUMENT_NAMES:  # passed as None by the caller, else the one the signature declares
            if name in self.arguments:
                return name
        for name in CACHE_ARGUMENT_NAMES:
            if name in self.parameters:
                return name
        return None  # only an error when a cache has to be passed in (with_changes)

    @property
    def cache(self) -> Cache | None:
        return self.arguments.get(self.cache_name) if self.cache_name else None

    @property
    def attention_mask(self):
        return self.arguments.get("attention_mask")

    @property
    def use_cache(self):
        return self.arguments.get("use_cache")

    @property
    def query_length(self) -> int | None:
        for name in ("input_ids", "inputs_embeds"):
            value = self.arguments.get(name)
            if value is not None:
                return value.shape[1]
        return None

    def takes(self, name: str) -> bool:
        return name in self.parameters

    def with_changes(self, *, cache=None, use_cache=None) -> tuple[tuple, dict]:
        """(args, kwargs) for the call with the cache and/or use_cache replaced (None: unchanged)."""
        kwargs = dict(self.arguments)
        if cache is not None:
            if self.cache_name is None:
                raise TypeError(f"the decoder's forward takes none of {CACHE_ARGUMENT_NAMES} (it takes "
                                f"{list(self.parameters)}): dijiang.hf_compat needs this release's name for the cache")
            kwargs[self.cache_name] = cache
        if use_cache is not None:
            kwargs["use_cache"] = use_cache
        return (), kwargs


# --------------------------------------------------------------------------------------------- modeling modules

def rotary_function(model_type: str):
    """The family's apply_rotary_pos_emb(q, k, cos, sin) on [B, H, T, d] tensors."""
    module_name = _MODELING_MODULE.get(model_type, model_type)
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return module.apply_rotary_pos_emb


# --------------------------------------------------------------------------------------------- families and classes

def family_of(config) -> str:
    """The HF family (model_type) of a config, converted (``dijiang_llama``) or not (``llama``)."""
    model_type = config.model_type
    return model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type


def config_class(family: str) -> type | None:
    """The family's config class, None where this transformers release does not have the family."""
    return CONFIG_MAPPING[family] if family in CONFIG_MAPPING else None


def causal_lm_class(family: str) -> type:
    return MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[family]]


def register_causal_lm(model_type: str, config_cls: type, model_cls: type) -> None:
    """Make AutoConfig / AutoModelForCausalLM map ``model_type`` to these classes (from_pretrained of a saved model)."""
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
