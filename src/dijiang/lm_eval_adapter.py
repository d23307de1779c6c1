"""lm-evaluation-harness adapter: a (converted) HF causal LM as lm_eval model type "dijiang".

lm_eval is optional (`pip install lm-eval`) and has no plugin discovery, so the model type must be
registered in the process that runs the harness. Two ways:

    python -m dijiang.lm_eval_adapter --model dijiang --model_args path=runs/ft/final \
        --tasks piqa,winogrande,arc_easy --batch_size 8          # any lm_eval CLI arguments

    import lm_eval, dijiang.lm_eval_adapter as a
    lm_eval.simple_evaluate(model=a.DiJiangLM(path="runs/ft/final"), tasks=["piqa"])

`path` is anything `dijiang.load_pretrained` takes ("smollm2", a folder saved by `dijiang train`,
a hub name); `convert=true` converts the loaded model with default settings (`window=W` for the hybrid).
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch

_LM_EVAL_MISSING = ("the lm-eval-harness adapter needs the optional `lm_eval` package: "
                    "pip install lm-eval (or pip install 'dijiang[eval]')")


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError as error:
        raise ImportError(_LM_EVAL_MISSING) from error
    return LM


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class DiJiangLMCore:
    """Scoring and generation on an HF model + tokenizer; the lm_eval `LM` methods, without lm_eval."""

    def __init__(self, model=None, tokenizer=None, path: str = "smollm2", convert=False, window: int = 0,
                 dtype: str = "float32", device: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, **_unused):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            import dijiang

            model, loaded_tokenizer = dijiang.load_pretrained(path, dtype=getattr(torch, dtype), device=device)
            tokenizer = tokenizer or loaded_tokenizer
            if _as_bool(convert):
                dijiang.convert(model, settings={"window": int(window)} if int(window) else None)
        if tokenizer is None:
            raise ValueError("DiJiangLM needs a tokenizer with the model")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing context spaces belong to the continuation's first token in BPE vocabularies.
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        return whole[:len(context_ids)], whole[len(context_ids):]

    @torch.no_grad()
    def score_continuations(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) per (context, cont) ids.

        Sequences are right-padded in batches: in a causal model padding after a token cannot change it.
        """
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for first in range(0, len(order), self.batch_size):
            indices = order[first:first + self.batch_size]
            inputs = []
            for i in indices:
                context, continuation = pairs[i]
                if not continuation:
                    raise ValueError("loglikelihood needs a non-empty continuation")
                context = context or [self.prefix_token_id]
                inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
            width = max(len(ids) for ids in inputs)
            batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in inputs], device=self.device)
            log_probs = torch.log_softmax(self.model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
            for row, i in enumerate(indices):
                continuation = pairs[i][1]
                end = len(inputs[row])
                cont_log_probs = log_probs[row, end - len(continuation):end]
                target = torch.tensor(continuation, device=self.device)
                total = float(cont_log_probs.gather(-1, target[:, None]).sum())
                greedy = bool((cont_log_probs.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.score_continuations([self._encode_pair(*request.args) for request in requests])

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        """Total log-likelihood of each text, first token conditioned on the prefix token, sliding windows."""
        from dijiang.evaluate import sliding_windows, window_nll

        totals = []
        for request in requests:
            ids = torch.tensor([self.prefix_token_id] + self._encode(request.args[0]))
            if ids.numel() < 2:
                totals.append(0.0)
                continue
            windows = sliding_windows(ids.numel(), self.max_length)
            totals.append(-sum(float(window_nll(self.model, ids, windows[i:i + self.batch_size]).sum())
                               for i in range(0, len(windows), self.batch_size)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_new_tokens", 256)))
            ids = self._encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            input_ids = torch.tensor([ids], device=self.device)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
            text = self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            outputs.append(text)
        return outputs


_REGISTERED: dict[str, type] = {}


def lm_class() -> type:
    """The lm_eval `LM` subclass (built on first use, since lm_eval is optional), registered as "dijiang"."""
    if "dijiang" in _REGISTERED:
        return _REGISTERED["dijiang"]
    base = _lm_base()

    class DiJiangLM(DiJiangLMCore, base):
        def __init__(self, *args, **kwargs):
            base.__init__(self)
            DiJiangLMCore.__init__(self, *args, **kwargs)

    DiJiangLM.__module__ = __name__
    try:
        import lm_eval.models  # noqa: F401  (fill the registry with the built-in models first)
        from lm_eval.api.registry import register_model

        register_model("dijiang")(DiJiangLM)
    except ImportError:
        pass  # a minimal/fake lm_eval: the class still works through simple_evaluate(model=instance)
    _REGISTERED["dijiang"] = DiJiangLM
    return DiJiangLM


def __getattr__(name: str):
    if name == "DiJiangLM":
        return lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """`lm_eval` command line with model type "dijiang" registered."""
    try:
        lm_class()
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
