"""The code a saved DiJiang model folder carries, so that it loads where `dijiang` is installed but not imported.

A converted model's classes (made per family by `dijiang.conversion.dijiang_classes`) name this module as
theirs and are registered for transformers' Auto classes, so `save_pretrained` copies this file next to
config.json and writes `auto_map` there, the way transformers saves any custom model. In a fresh process,
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` (so also `pipeline(...)` and
`lm_eval --model hf --model_args pretrained=folder,trust_remote_code=True`) imports that copy, which hands back
the installed package's classes. Without `trust_remote_code`, transformers asks for it: a model type that
transformers does not ship resolves only through code it runs (it reads no entry points).

transformers copies this one file and checks that what it imports is installed: absolute `dijiang` imports only.
"""
from __future__ import annotations

AUTO_CLASSES = {"config": "AutoConfig", "model": "AutoModelForCausalLM"}


def ship_with_saved_models(config_class: type, model_class: type) -> None:
    """Make `save_pretrained` copy this file and write `auto_map` for both classes."""
    for cls in (config_class, model_class):
        cls.__module__ = __name__  # transformers copies the file of the class's module
    config_class.register_for_auto_class(AUTO_CLASSES["config"])
    model_class.register_for_auto_class(AUTO_CLASSES["model"])


def __getattr__(name: str) -> type:
    """`DiJiangLlamaForCausalLM`, `DiJiangLlamaConfig`, ...: what `auto_map` names (and what pickle looks up)."""
    if name.startswith("__"):
        raise AttributeError(name)
    from dijiang.conversion import register_all

    for classes in register_all().values():
        for cls in classes:
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (no DiJiang class of that name)")
