"""Perplexity evaluation: the usual strided loop vs hftextgen's batched scoring.

    python -m bench.evaluate [--quick] [--model tiny|gpt2] [--tokens N] [--out FILE]

Baseline: the loop of the transformers perplexity guide (one window per forward, stride half
the context, labels masked with -100, logits for every position). Ours:
hftextgen.evaluate.score: windows batched (evaluate.batch_size), logits computed only at the
scored positions. Both score the same held-out Shakespeare text with the same windows, so
their perplexities differ only by the guide's off-by-one (the first token of each window is
never scored there): both values are printed. Throughput = scored tokens / s.
"""

from __future__ import annotations

import math
import time

import torch

from bench import common
from bench.generate import build


def guide_loop(lm, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + context, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end].to(lm.device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.inference_mode():
            loss = lm(input_ids, labels=target_ids).loss
        valid = (target_ids != -100).sum().item() - 1  # the model shifts labels left by one
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == ids.size(1):
            break
    return nll_sum, n_tokens


def main() -> None:
    from hftextgen.data import DataConfig
    from hftextgen.evaluate.run import score
    from tests.oracle import document_ids, split_texts

    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "gpt2"), default=None)
    p.add_argument("--tokens", type=int, default=None, help="evaluate this many tokens of the held-out plays")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    load_before = common.load()
    from hftextgen.runtime import reuse_freed_memory

    reuse_freed_memory()  # as `hftextgen generate/evaluate` do; process-wide, so both sides get it
    gpu = torch.cuda.is_available()
    model = args.model or ("gpt2" if gpu else "tiny")
    lm, tok = build(model, "cuda" if gpu else "cpu")
    context = 1024 if model == "gpt2" else 128
    stride = context // 2
    budget = args.tokens or (4_000 if args.quick else 40_000)

    text = split_texts(DataConfig()).validation[0]["text"]
    (doc,) = document_ids([text], tok, add_eos=True)
    doc = doc[:budget]
    ids = torch.tensor([doc])

    lm(ids[:, :context].to(lm.device))  # warm-up
    start = time.perf_counter()
    base_nll, base_n = guide_loop(lm, ids, context, stride)
    t_base = time.perf_counter() - start
    start = time.perf_counter()
    ((our_nll, our_n),) = score(lm, [doc], context, stride, args.batch_size)
    t_ours = time.perf_counter() - start

    rows = [
        common.Row(
            f"perplexity, context {context}, stride {stride}",
            base_n / t_base,
            our_n / t_ours,
            "tok/s",
            extra={
                "baseline_perplexity": math.exp(base_nll / base_n),
                "ours_perplexity": math.exp(our_nll / our_n),
                "baseline_tokens": base_n,
                "ours_tokens": our_n,
            },
        )
    ]
    print(
        f"perplexity: guide loop {math.exp(base_nll / base_n):.3f} over {base_n:,} tokens, "
        f"ours {math.exp(our_nll / our_n):.3f} over {our_n:,} tokens (ours scores every token once)"
    )
    common.report(
        "evaluate",
        f"Evaluation, {model} (random weights), {len(doc):,} tokens of a held-out play, batch {args.batch_size}",
        rows,
        args,
        load_before,
    )


if __name__ == "__main__":
    main()
