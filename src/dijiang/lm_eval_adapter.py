"""lm-evaluation-harness: a DiJiang model evaluated by lm_eval's own `HFLM`, also as model type "dijiang".

A saved DiJiang folder needs nothing from here: it loads through transformers' remote-code path (see
`dijiang.modeling_dijiang`), so the stock model type runs it, in any process where dijiang is installed:

    lm_eval --model hf --model_args pretrained=runs/ft/final,trust_remote_code=True --tasks piqa --device cpu

Model type "dijiang" is `HFLM` plus what `hf` cannot do: `pretrained` may be anything
`dijiang.load_pretrained` takes (the embedded "smollm2", a .gguf file, a folder, a hub name), `convert=true`
converts the loaded model on the fly (`window=W` for the hybrid, `sinks=N` for its attention sinks), and the device defaults to CUDA when there
is one, else the CPU. lm_eval discovers no plugins, so the type exists in processes that import this module:

    python -m dijiang.lm_eval_adapter --model dijiang --model_args pretrained=smollm2,convert=true,window=64 \\
        --tasks piqa,arc_easy --batch_size 8          # any lm_eval command-line arguments

    from dijiang.lm_eval_adapter import DiJiangLM
    lm_eval.simple_evaluate(model=DiJiangLM(pretrained="runs/ft/final"), tasks=["piqa"])

lm_eval is an optional dependency: pip install 'dijiang[eval]' (or pip install lm-eval).
"""
from __future__ import annotations

import sys

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:
    raise ImportError("dijiang.lm_eval_adapter needs the optional package lm-eval: "
                      "pip install 'dijiang[eval]' (or pip install lm-eval)") from error


def available_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_bool(value) -> bool:  # model_args arrive as strings ("convert=true")
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("dijiang")
class DiJiangLM(HFLM):
    """`HFLM` on a (converted) model that `dijiang.load_pretrained` can load; see the module docstring."""

    def __init__(self, pretrained: str = "smollm2", convert=False, window: int = 0, sinks: int = 0,
                 device: str | None = None, **kwargs):
        from dijiang.loading import model_folder

        device = device or available_device()
        folder = model_folder(pretrained)  # embedded names and .gguf files: their cached safetensors copy
        if not _as_bool(convert):
            super().__init__(pretrained=folder, device=device, **kwargs)
            return
        import dijiang

        dtype = kwargs.pop("dtype", "float32")
        model, tokenizer = dijiang.load_pretrained(folder, dtype=getattr(torch, "float32" if dtype == "auto" else dtype),
                                                   device=device)
        dijiang.convert(model, settings={"window": int(window), "sinks": int(sinks)})
        super().__init__(pretrained=model.eval(), tokenizer=kwargs.pop("tokenizer", tokenizer), **kwargs)


def main(argv: list[str] | None = None) -> int:
    """The `lm_eval` command line, with model type "dijiang" registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
