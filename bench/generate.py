"""Generation: plain `model.generate` vs hftextgen's Generator, dynamic and static cache, on the same model and prompts.

    python -m bench.generate [--quick] [--model tiny|gpt2] [--new-tokens N] [--repeats N] [--compiled] [--hf-static]
                             [--out FILE]

Model: random weights (speed does not depend on them) of bench/tiny-gpt2.yaml's GPT-2 (4 x
128, 50257-token vocabulary; the CPU default) or GPT-2 small (124M; the default on a GPU), fp32.
Every input starts with EOS, as hftextgen's do. Each configuration is timed once per repeat
after a warm-up call (compilation and graph capture happen there), best of --repeats:
- HF generate, top-k 50 sampling, at batch 1 and on 64 left-padded prompts (the baseline);
- ours (Generator, seeded per-sample top-k 50 sampling), generate.cache dynamic: transformers'
  generate underneath;
- ours, generate.cache static: hftextgen/generate/static.py (a CUDA graph per step on a GPU);
- --compiled: the same with the step compiled by torch.compile before capture;
- --hf-static: HF generate with cache_implementation="static" at batch 1 (transformers compiles
  its forward on a GPU);
- on a CPU, also 16 prompts: HF generate once per prompt (a pipeline loop) vs ours batched.
Tokens/s counts new tokens (the baseline is held to exactly N with min_new_tokens; ours may end
a sample at EOS and counts what it made). Before timing, greedy tokens of ours (dynamic) are
checked equal to generate's; the static cache's greedy and sampled tokens are compared too:
equal on a CPU (checked), reported on a GPU (where masked attention may round differently).
"""

from __future__ import annotations

import time

import torch

from bench import common

PROMPTS = ["ROMEO:\n", "KING HENRY V:\nOnce more", "First Citizen:\nBefore we proceed", "", "O", "HAMLET:\nTo be"]
MANY = (PROMPTS * 11)[:64]
TOP_K = {"preset": "balanced", "top_p": 1.0, "temperature": 1.0}  # top-k 50, like the baseline


def build(model: str, device: str):
    from transformers import AutoModelForCausalLM, GPT2Config

    from hftextgen.model import tokenizer

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
    """Plain generate on left-padded prompts; returns the new tokens."""
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


def generator(lm, tok, new: int, batch: int, compiled: bool = False, **settings):
    """One Generator, kept across calls (its static decoder keeps its captured steps)."""
    from hftextgen.generate import GenerateConfig
    from hftextgen.generate.generator import Generator
    from hftextgen.generate.static import StaticDecoder

    made = Generator(lm, tok, GenerateConfig(max_new_tokens=new, batch_size=batch, **settings))
    if compiled:
        made.fast = StaticDecoder(lm, compile=True)
    return made


def same_samples(a: list, b: list) -> dict:
    """How many samples of two runs are the same text."""
    equal = sum(x.completion == y.completion for x, y in zip(a, b, strict=True))
    return {"equal": equal, "of": len(a)}


def checks(lm, tok, new: int, gpu: bool) -> dict:
    """Same computation: ours (dynamic) is generate's greedy tokens; the static cache's too."""
    reference = tok.decode(hf_generate(lm, tok, PROMPTS[:1], new, do_sample=False)[0].tolist())
    (dynamic,) = generator(lm, tok, new, 1, preset="greedy")(PROMPTS[:1])
    assert dynamic.completion == reference, "greedy decoding differs from model.generate"
    (static,) = generator(lm, tok, new, 1, preset="greedy", cache="static")(PROMPTS[:1])
    out = {"greedy batch 1, static vs generate": same_samples([static], [dynamic])}
    many = {k: generator(lm, tok, new, 64, cache=k, **TOP_K)(MANY) for k in ("dynamic", "static")}
    out["top-k sampling batch 64, static vs dynamic"] = same_samples(many["static"], many["dynamic"])
    # The default preset: top-p sorts the vocabulary inside the captured step.
    balanced = {k: generator(lm, tok, new, 8, preset="balanced", cache=k) for k in ("dynamic", "static")}
    texts = {k: g(PROMPTS) for k, g in balanced.items()}
    out["balanced preset batch 6, static vs dynamic"] = same_samples(texts["static"], texts["dynamic"])
    out["capture error"] = balanced["static"].fast.capture_error
    for what, seen in out.items():
        if what == "capture error":
            print(f"[generate] CUDA graph capture: {seen or 'ok' if gpu else 'not used (CPU)'}", flush=True)
            continue
        print(f"[generate] {what}: {seen['equal']} of {seen['of']} samples the same", flush=True)
        # On a CPU the static decoder runs generate's operations in generate's order: equal.
        assert gpu or seen["equal"] == seen["of"], f"{what}: the static cache changed the text"
    return out


def compiled_check(lm, tok, new: int, gpu: bool) -> dict:
    """The compiled step's greedy tokens against generate's (through ours, dynamic)."""
    (dynamic,) = generator(lm, tok, new, 1, preset="greedy")(PROMPTS[:1])
    (compiled,) = generator(lm, tok, new, 1, compiled=True, preset="greedy", cache="static")(PROMPTS[:1])
    seen = same_samples([compiled], [dynamic])
    print(f"[generate] greedy batch 1, compiled static step vs generate: {seen['equal']} of {seen['of']}", flush=True)
    return {"greedy batch 1, compiled static step vs generate": seen}


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "gpt2"), default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per configuration (default 3, quick 1)")
    p.add_argument("--compiled", action="store_true", help="also ours with the static step compiled")
    p.add_argument("--hf-static", action="store_true", help="also HF generate with its static cache, batch 1")
    p.add_argument("--no-main", action="store_true", help="only the rows --compiled and --hf-static ask for")
    args = p.parse_args()
    load_before = common.load()
    from hftextgen.runtime import reuse_freed_memory

    reuse_freed_memory()  # as `hftextgen generate/evaluate` do; process-wide, so both sides get it
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    model = args.model or ("gpt2" if gpu else "tiny")
    new = args.new_tokens or (16 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    lm, tok = build(model, device)
    agreement = {} if args.no_main else checks(lm, tok, new, gpu)
    if args.compiled:
        agreement.update(compiled_check(lm, tok, new, gpu))

    sample = {"do_sample": True, "top_k": 50}
    measured: dict[str, float] = {}  # tokens/s of each configuration

    def measure(name: str, fn, tokens: int | None = None) -> None:
        fn()  # warm-up: compilation, graph capture, allocator
        seconds, out = timed(fn, repeats)
        made = tokens if tokens is not None else sum(s.new_tokens for s in out)  # ours may end at EOS
        measured[name] = made / seconds
        print(f"[generate] {name}: {measured[name]:,.0f} tokens/s ({made} tokens, {seconds:.3f} s)", flush=True)

    for batch, prompts in ((1, PROMPTS[:1]), (64, MANY)):
        if not args.no_main:
            measure(
                f"HF generate, batch {batch}", lambda q=prompts: hf_generate(lm, tok, q, new, **sample), batch * new
            )
            for cache in ("dynamic", "static"):
                ours = generator(lm, tok, new, batch, cache=cache, **TOP_K)
                measure(f"ours, {cache} cache, batch {batch}", lambda g=ours, q=prompts: g(q))
        if args.compiled:
            ours = generator(lm, tok, new, batch, compiled=True, cache="static", **TOP_K)
            measure(f"ours, static cache, compiled step, batch {batch}", lambda g=ours, q=prompts: g(q))
    if args.hf_static:
        measure(
            "HF generate, static cache, batch 1",
            lambda: hf_generate(lm, tok, PROMPTS[:1], new, cache_implementation="static", **sample),
            new,
        )
    if not gpu and not args.no_main:  # a pipeline's loop: one call per prompt (too slow to be worth a GPU's time)
        sixteen = (PROMPTS * 3)[:16]
        measure(
            "HF generate, 16 prompts one by one",
            lambda: [hf_generate(lm, tok, [q], new, **sample) for q in sixteen],
            16 * new,
        )
        ours = generator(lm, tok, new, 16, **TOP_K)
        measure("ours, 16 prompts batched", lambda: ours(sixteen))

    rows = []
    for name, rate in measured.items():
        if name.startswith("ours"):
            batch = name.rsplit(" ", 1)[-1]
            base = measured.get(f"HF generate, batch {batch}", measured.get("HF generate, 16 prompts one by one"))
            rows.append(common.Row(name, base, rate, "tok/s"))
        elif name == "HF generate, static cache, batch 1":
            rows.append(common.Row(name, measured.get("HF generate, batch 1"), rate, "tok/s", note="HF vs HF"))
    common.report(
        "generate",
        f"Generation, {model} ({lm.num_parameters() / 1e6:.1f}M parameters, random weights, fp32) on {device}, "
        f"{new} new tokens, top-k 50 sampling; best of {repeats}; baseline: HF generate at the same batch",
        rows,
        args,
        load_before,
        tokens_per_s=measured,
        agreement=agreement,
    )


if __name__ == "__main__":
    main()
