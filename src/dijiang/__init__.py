"""dijiang: turn pretrained Hugging Face causal LMs into DiJiang linear-attention models."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, imported lazily so that `import dijiang` (and so `dijiang --help`) stays cheap. Using any of
# them imports dijiang.conversion, which registers the model classes with transformers' Auto classes.
_EXPORTS = {
    "build_feature_map": "dijiang.feature_maps",
    "FEATURE_MAPS": "dijiang.feature_maps",
    "linear_attention": "dijiang.ops",
    "window_attention": "dijiang.ops",
    "DiJiangAttention": "dijiang.attention",
    "DiJiangSettings": "dijiang.attention",
    "convert": "dijiang.conversion",
    "load_pretrained": "dijiang.loading",
    "DiJiangCache": "dijiang.cache",
    "fast_generate": "dijiang.fast_decode",
    "TrainConfig": "dijiang.train",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dijiang' has no attribute {name!r}")

