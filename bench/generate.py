"""Generation: plain `model.generate` vs hftextgen's Generator, on the same model and prompts.

    python -m bench.generate [--quick] [--model tiny|gpt2] [--new-tokens N] [--out FILE]

Model: random weights (speed does not depend on them) of the tiny recipe's shape (4 x 128,
50257-token vocabulary; the CPU default) or GPT-2 small (124M; the default on a GPU).
Every input starts with EOS, as hftextgen's do. Rows:
- batch 1: one prompt, top-k 50 sampling: HF generate vs ours (seeded per-sample sampling);
  on a GPU also ours with the static cache, which transformers compiles;
- 16 prompts: HF generate called once per prompt (what a pipeline loop does) vs ours batched;
- batch 64: HF generate on 64 left-padded prompts vs ours (static cache on a GPU).
Tokens/s counts new tokens (the baseline is held to exactly N with min_new_tokens). Before
timing, greedy decoding of both is checked to give the same tokens.
"""

from __future__ import annotations

import time

import torch

from bench import common

PROMPTS = ["ROMEO:\n", "KING HENRY V:\nOnce more", "First Citizen:\nBefore we proceed", "", "O", "HAMLET:\nTo be"]


def build(model: str, device: str):
    from transformers import AutoModelForCausalLM, GPT2Config

    from hftextgen import tokenizer

    tok = tokenizer.ready_for_lm(tokenizer.bundled_gpt2(), "the bundled GPT-2 tokenizer")
    shape = {"tiny": dict(n_layer=4, n_head=4, n_embd=128, n_positions=1024), "gpt2": {}}[model]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **shape)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()
    return lm, tok


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def hf_generate(lm, tok, prompts: list[str], new: int, **kwargs):
    """Plain generate on left-padded prompts; returns the count of new tokens."""
    ids = [[tok.eos_token_id, *tok(p)["input_ids"]] for p in prompts]
    width = max(map(len, ids))
    x = torch.tensor([[tok.eos_token_id] * (width - len(i)) + i for i in ids], device=lm.device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=lm.device)
    with torch.inference_mode():
        out = lm.generate(
            input_ids=x,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=tok.eos_token_id,
            **kwargs,
        )
    return out[:, width:]


def ours(lm, tok, prompts: list[str], new: int, batch: int, **settings):
    from hftextgen.config import GenerateConfig
    from hftextgen.generate import Generator

    return Generator(lm, tok, GenerateConfig(max_new_tokens=new, batch_size=batch, **settings))(prompts)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "gpt2"), default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    args = p.parse_args()
    load_before = common.load()
    from hftextgen.runtime import reuse_freed_memory

    reuse_freed_memory()  # as `hftextgen generate/evaluate` do; process-wide, so both sides get it
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    model = args.model or ("gpt2" if gpu else "tiny")
    new = args.new_tokens or (16 if args.quick else 128)
    repeats = 1 if args.quick else 3
    lm, tok = build(model, device)

    # Same computation: greedy tokens agree.
    reference = hf_generate(lm, tok, PROMPTS[:1], new, do_sample=False)[0].tolist()
    (mine,) = ours(lm, tok, PROMPTS[:1], new, 1, preset="greedy")
    assert tok.decode(reference) == mine.completion, "greedy decoding differs from model.generate"

    sample = {"do_sample": True, "top_k": 50}
    settings = {"preset": "balanced", "top_p": 1.0, "temperature": 1.0}  # top-k 50, like the baseline
    rows = []

    def row(what, base_fn, ours_fn, tokens, note=""):
        ours_fn()  # warm-up (and compilation, for the static cache)
        base_fn()
        t_base, _ = timed(base_fn, repeats)
        t_ours, samples = timed(ours_fn, repeats)
        made = sum(s.new_tokens for s in samples)  # a sample may end early at EOS
        rows.append(common.Row(what, tokens / t_base, made / t_ours, "tok/s", note=note))

    row(
        "batch 1, top-k sampling",
        lambda: hf_generate(lm, tok, PROMPTS[:1], new, **sample),
        lambda: ours(lm, tok, PROMPTS[:1], new, 1, **settings),
        new,
    )
    sixteen = (PROMPTS * 3)[:16]
    row(
        "16 prompts: one generate call each vs batched",
        lambda: [hf_generate(lm, tok, [q], new, **sample) for q in sixteen],
        lambda: ours(lm, tok, sixteen, new, 16, **settings),
        16 * new,
    )
    many = (PROMPTS * 11)[:64]
    row(
        "batch 64, top-k sampling",
        lambda: hf_generate(lm, tok, many, new, **sample),
        lambda: ours(lm, tok, many, new, 64, **settings),
        64 * new,
    )
    if gpu:
        row(
            "batch 1, ours with static cache (compiled)",
            lambda: hf_generate(lm, tok, PROMPTS[:1], new, **sample),
            lambda: ours(lm, tok, PROMPTS[:1], new, 1, cache="static", **settings),
            new,
        )
        row(
            "batch 64, ours with static cache (compiled)",
            lambda: hf_generate(lm, tok, many, new, **sample),
            lambda: ours(lm, tok, many, new, 64, cache="static", **settings),
            64 * new,
        )
    common.report(
        "generate",
        f"Generation, {model} ({lm.num_parameters() / 1e6:.1f}M parameters, random weights) on {device}, "
        f"{new} new tokens; best of {repeats}",
        rows,
        args,
        load_before,
    )


if __name__ == "__main__":
    main()
