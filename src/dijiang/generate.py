"""`dijiang generate`: stream tokens from a (converted) model."""
from __future__ import annotations

import torch
from transformers import TextStreamer


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, chat: bool = False, streamer=None) -> str:
    """Greedy (temperature 0) or sampled continuation of `prompt`; returns the new text only."""
    if not prompt:
        raise ValueError("prompt is empty")
    if chat:
        prompt = chat_prompt(tokenizer, prompt)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=streamer,
                                **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as one user turn of the tokenizer's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def add_cli(subparsers) -> None:
    from dijiang.arguments import Number, non_negative_float, non_negative_int, positive_int

    parser = subparsers.add_parser("generate", help="generate text from a converted (or any) model, streaming")
    parser.add_argument("--model", default="smollm2", help="converted model dir, embedded name, .gguf or hub name")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=Number(float, 0, 1, open_minimum=True), default=1.0)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--fast", action="store_true",
                        help="static-state decode loop (CUDA graph on GPU; dijiang.fast_decode); prints at the end")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from dijiang.conversion import load_pretrained

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load_pretrained(args.model, dtype=dtype, device=args.device)
    model.eval()
    if args.fast:
        from dijiang.fast_decode import fast_generate

        text = chat_prompt(tokenizer, args.prompt) if args.chat else args.prompt
        ids = tokenizer(text, return_tensors="pt").input_ids.to(args.device)
        out = fast_generate(model, ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                            temperature=max(args.temperature, 1e-5), top_p=args.top_p, seed=args.seed)
        print(args.prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return 0
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(args.prompt, end="", flush=True)
    generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed, chat=args.chat, streamer=streamer)
    return 0
