"""`dijiang generate`: stream tokens from a (converted) model."""
from __future__ import annotations

import argparse
import sys

import torch
from transformers import TextStreamer


def uses_chat(tokenizer, chat: bool | None) -> bool:
    """chat=None (the default): the chat template when the tokenizer has one, i.e. for instruct models."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("--chat: this tokenizer has no chat template; drop --chat to continue the prompt as text")
    return has_template if chat is None else chat


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as one user turn in the tokenizer's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, chat: bool | None = None, streamer=None) -> str:
    """Greedy (temperature 0) or sampled continuation of `prompt`; returns the new text only.

    chat: wrap the prompt in the chat template (None: when the tokenizer has one).
    """
    if not prompt:
        raise ValueError("prompt is empty")
    chat = uses_chat(tokenizer, chat)
    if chat:
        prompt = chat_prompt(tokenizer, prompt)
    # a chat template already starts with the special tokens it needs
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).to(model.device)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=streamer,
                                **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def read_prompt(prompt: str | None, stdin=None) -> str:
    """--prompt TEXT, or the whole of stdin for `--prompt -` or no --prompt with piped input."""
    stdin = sys.stdin if stdin is None else stdin
    if prompt == "-" or (prompt is None and not stdin.isatty()):
        prompt = stdin.read().rstrip("\n")
    if not prompt:
        raise ValueError("no prompt: give --prompt TEXT, or pipe it in (echo 'Hello' | dijiang generate)")
    return prompt


def add_cli(subparsers) -> None:
    from dijiang.arguments import Number, non_negative_float, non_negative_int, positive_int

    parser = subparsers.add_parser("generate")
    parser.add_argument("--model", default="smollm2", help="converted model dir, embedded name, .gguf or hub name")
    parser.add_argument("--prompt", default=None,
                        help="the prompt; '-' or no --prompt with piped input: read it from stdin")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=Number(float, 0, 1, open_minimum=True), default=1.0, help="nucleus sampling: keep this much probability mass")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap the prompt in the tokenizer's chat template and print only the answer "
                             "(default: on when the tokenizer has a template, as instruct models do; "
                             "--no-chat continues the prompt as plain text)")
    parser.add_argument("--fast", action="store_true",
                        help="static-state decode loop (CUDA graph on GPU; dijiang.fast_decode); prints at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (cuda when available)")
    parser.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from dijiang.loading import load_pretrained

    prompt = read_prompt(args.prompt)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load_pretrained(args.model, dtype=dtype, device=args.device)
    model.eval()
    chat = uses_chat(tokenizer, args.chat)
    shown = "" if chat else prompt  # a plain continuation reads on from the prompt; a chat answer stands alone
    if args.fast:
        from dijiang.fast_decode import fast_generate

        text = chat_prompt(tokenizer, prompt) if chat else prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids.to(args.device)
        out = fast_generate(model, ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                            temperature=max(args.temperature, 1e-5), top_p=args.top_p, seed=args.seed)
        print(shown + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return 0
    print(shown, end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate_text(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed, chat=chat, streamer=streamer)
    return 0
