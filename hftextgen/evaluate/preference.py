"""Evaluate stage for preference pairs: held-out pairs scored before and after training, answers generated.

Scoring. A pair's chosen and rejected sequences (the prompt, then the answer) are packed into rows
as in training (data.pairs.PairCollator: each attends only to itself) and scored in one forward
pass a batch; each answer's log-probability is the sum over its trained tokens (the answer and
the end token that closes it), each predicted from the tokens before it. `sequence_logps` is that
sum, shared with the training loss and the reference's log-probabilities.

Metrics, of the model after training and of the reference before it (its log-probabilities are
the ones computed before training, cached with the data):
  accuracy              the share of pairs whose chosen answer the model finds more likely
                        than the rejected one (summed log-probability); accuracy_per_token: by
                        the mean log-probability per token (what length-normalised objectives
                        compare)
  chosen/rejected bits per byte   -log2 p of the answers over their UTF-8 bytes
  rewards (TRL's)       the objective's implicit reward: beta x (log p - log p_ref) for dpo and
                        ipo (zero for the reference itself), beta x mean log p for simpo and orpo;
                        reward_accuracy (chosen rewarded above rejected) and reward_margin (mean
                        difference), TRL's rewards/accuracies and rewards/margins on held-out pairs

Answers. The first evaluate.max_answers held-out prompts are answered with the recipe's decoding
preset, seeded (answers.generate_answers), beside the chosen answer as the reference and the
rejected one: samples.jsonl and samples.md. Files are put in place whole.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .. import progress
from ..errors import UserError
from ..files import write_atomic, write_json
from . import answers
from .run import eval_record

# Per pair: summed log-probability of the chosen and the rejected answer, and their scored tokens.
SCORE_COLUMNS = ("chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens")


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each row of `logits` [N, V], in fp32 (a log-softmax, gathered)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def sequence_logps(logits: torch.Tensor, labels, sequences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's answer tokens, their count, and the
    log-probability of every kept position) of a batch of data.pairs.PairCollator: `logits` are
    the kept positions' (logits_to_keep), or every position's from a model that ignored it."""
    if logits.dim() == 3:
        logits = logits[labels.keep.to(logits.device)]
    logp = token_logps(logits, labels.targets)
    answer = labels.answer
    owner = labels.sequence[answer]
    sums = torch.zeros(sequences, dtype=logp.dtype, device=logp.device).index_add(0, owner, logp[answer])
    counts = torch.bincount(owner, minlength=sequences)
    return sums, counts, logp


def forward(lm, batch: dict) -> torch.Tensor:
    """The logits of a collated batch's kept positions, without a KV cache (with one,
    transformers would not keep the packed sequences apart)."""
    device = lm.device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    return lm(**inputs, use_cache=False).logits


@torch.inference_mode()
def score_pairs(lm, pairs, collator, batch_size: int, bf16: bool = False, desc: str = "Scoring pairs", stop=None):
    """SCORE_COLUMNS for each of `pairs` (float64 [n, 4]), `batch_size` pairs a forward pass, in
    order. `stop()`, asked after each batch: True ends early, with NaN for the pairs not scored."""
    out = np.full((len(pairs), len(SCORE_COLUMNS)), np.nan)
    autocast = torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=bf16)
    shown = progress.bar(len(pairs), desc, "pairs")
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collator([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
            labels, n = batch["labels"].to(lm.device), batch["labels"].pairs
            with autocast:
                logits = forward(lm, batch)
            sums, counts, _ = sequence_logps(logits, labels, 2 * n)
            del logits
            sums, counts = sums.double().cpu().numpy(), counts.cpu().numpy()
            out[start : start + n] = np.stack([sums[:n], sums[n:], counts[:n], counts[n:]], axis=1)
            shown.update(n)
            if stop is not None and stop():
                break
    finally:
        shown.close()
    return out


# ---------------------------------------------------------------- metrics


def rewards(scores: np.ndarray, reference: np.ndarray | None, objective: str, beta: float) -> tuple[np.ndarray, ...]:
    """(chosen, rejected) rewards per pair, as TRL defines them for the objective; reference:
    the reference's (chosen, rejected) summed log-probabilities."""
    if objective in ("dpo", "ipo"):
        return beta * (scores[:, 0] - reference[:, 0]), beta * (scores[:, 1] - reference[:, 1])
    return beta * scores[:, 0] / scores[:, 2], beta * scores[:, 1] / scores[:, 3]


def metrics(scores: np.ndarray, answer_bytes: np.ndarray, reward: tuple | None = None) -> dict:
    """The held-out figures of one model's SCORE_COLUMNS (see the module docstring)."""
    chosen, rejected, n_chosen, n_rejected = scores.T
    out = {
        "accuracy": float(np.mean(chosen > rejected)),
        "accuracy_per_token": float(np.mean(chosen / n_chosen > rejected / n_rejected)),
        "chosen_bits_per_byte": -math.fsum(chosen) / math.log(2) / int(answer_bytes[:, 0].sum()),
        "rejected_bits_per_byte": -math.fsum(rejected) / math.log(2) / int(answer_bytes[:, 1].sum()),
        "chosen_logps": float(np.mean(chosen)),
        "rejected_logps": float(np.mean(rejected)),
    }
    if reward is not None:
        c, r = reward
        out.update(
            reward_accuracy=float(np.mean(c > r)),
            reward_margin=float(np.mean(c - r)),
            chosen_reward=float(np.mean(c)),
            rejected_reward=float(np.mean(r)),
        )
    return out


def answer_bytes(tok, pairs) -> np.ndarray:
    """UTF-8 bytes of each pair's (chosen, rejected) answer text: its trained tokens decoded, the
    markers that end turns (the tokenizer's special tokens) left out, as task data counts an
    answer's bytes."""
    from ..data import special_tokens

    markers = special_tokens(tok)
    out = np.zeros((len(pairs), 2), np.int64)
    for i in range(len(pairs)):
        item = pairs[i]
        for j, (ids, trained) in enumerate(
            ((item.chosen, item.chosen_trained), (item.rejected, item.rejected_trained))
        ):
            out[i, j] = len(markers.sub("", tok.decode(ids[trained])).encode("utf-8"))
    return out


# ---------------------------------------------------------------- answers


def questions(tok, pairs, names: list[str], ends: set[int], limit: int) -> list[answers.Question]:
    """The first `limit` pairs as questions: the prompt, the chosen answer as the reference."""
    out = []
    for i in range(min(limit, len(pairs))):
        item = pairs[i]
        taught = [int(t) for t in item.chosen[: int(np.flatnonzero(item.chosen_trained)[-1]) + 1]]
        reference = answers.reference_text(tok, taught, ends)
        out.append(answers.Question(i, names[i], [int(t) for t in item.prompt], taught, reference))
    return out


def generated(lm, tok, pairs, names, generate_cfg, n: int, model_name: str, out_dir) -> dict | None:
    """Answers to the first `n` held-out prompts beside the chosen (and rejected) answers:
    samples.jsonl and samples.md; their summary for eval.json (None: n is 0)."""
    ends = answers.end_ids(tok)
    asked = questions(tok, pairs, names, ends, n) if n > 0 else []
    if not asked:
        return None
    made = answers.generate_answers(lm, tok, asked, generate_cfg, ends)
    match = answers.match_answers(made)
    records = answers.sample_records(made, match, generate_cfg, model_name)
    for record, q in zip(records, asked, strict=True):
        item = pairs[q.index]
        record["rejected"] = answers.reference_text(tok, [int(t) for t in item.rejected[item.rejected_trained]], ends)
    import json

    write_atomic(out_dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomic(
        out_dir / "samples.md",
        answers.samples_markdown(records, f"Answers of {model_name} (reference: the chosen answer)"),
    )
    return {
        "count": len(made),
        "exact_match": match["exact_match"],
        "f1": match["f1"],
        "seed": generate_cfg.seed,
        **answers.settings_of(generate_cfg),
        "shown": records[:3],
    }


# ---------------------------------------------------------------- files


ROWS = (
    ("accuracy", "preference accuracy (chosen more likely)", "{:.1%}"),
    ("accuracy_per_token", "preference accuracy, per token", "{:.1%}"),
    ("chosen_bits_per_byte", "chosen answers, bits per byte", "{:.4f}"),
    ("rejected_bits_per_byte", "rejected answers, bits per byte", "{:.4f}"),
    ("reward_accuracy", "reward accuracy (rewards/accuracies)", "{:.1%}"),
    ("reward_margin", "reward margin (rewards/margins)", "{:.4f}"),
)


def pairs_markdown(result: dict) -> str:
    before, after = result.get("before") or {}, result["after"]
    show = lambda values, key, form: form.format(values[key]) if values.get(key) is not None else "-"  # noqa: E731
    lines = [
        f"# Evaluation of {result['model']} on held-out preference pairs",
        "",
        f"Data: {result['data']}. Objective {result['objective']}, beta {result['beta']:g}.",
        "",
        "| metric | before (the reference) | after |",
        "|---|---|---|",
        *(f"| {name} | {show(before, key, form)} | {show(after, key, form)} |" for key, name, form in ROWS),
        "",
        f"{result['pairs']:,} pairs; {result['chosen_bytes']:,} and {result['rejected_bytes']:,} UTF-8 bytes of chosen "
        f"and rejected answers. Before: the reference's log-probabilities, computed before training.",
    ]
    if not before:
        lines[-1] = f"{result['pairs']:,} pairs. Before: no reference log-probabilities were found for these pairs."
    samples = result.get("samples")
    if samples:
        lines += [
            "",
            f"Answers generated with preset `{samples['preset']}`, seed {samples['seed']} + index: samples.md.",
            "",
        ]
        for r in samples["shown"]:
            lines += [f"- chosen: {r['reference']!r}", f"  generated: {r['answer']!r}"]
    return "\n".join(lines) + "\n"


def evaluate_pairs(lm, tok, packed, *, cfg, generate_cfg, preference, out_dir, model_name: str, say=print) -> dict:
    """The evaluator on preference data: the held-out pairs (data.max_eval_tokens of them)
    scored by the model (after) and, from their cached log-probabilities, the reference (before);
    answers to the first evaluate.max_answers prompts; eval.json, eval.md and the samples."""
    from ..data import PairCollator

    pairs = packed.eval_items
    if not len(pairs):
        raise UserError("evaluation: no held-out pairs to score: hold some out in the data section")
    bf16 = cfg.bf16 if cfg.bf16 is not None else lm.device.type == "cuda" and torch.cuda.is_bf16_supported()
    collator = PairCollator(tok.pad_token_id, packed.cfg.block_size)
    say(f"evaluating {model_name} on {len(pairs):,} held-out preference pairs ...")
    started = time.perf_counter()
    scores = score_pairs(lm, pairs, collator, cfg.batch_size, bf16)
    seconds = time.perf_counter() - started
    sizes = answer_bytes(tok, pairs)
    reference = None if pairs.reference is None else np.asarray(pairs.reference)[pairs.indices]
    objective, beta = preference.objective, preference.beta_value
    has_reference = reference is not None and not np.isnan(reference).any()
    after_reward = (
        None if objective in ("dpo", "ipo") and not has_reference else rewards(scores, reference, objective, beta)
    )
    result = {
        "pairs": len(pairs),
        "objective": objective,
        "beta": beta,
        "chosen_bytes": int(sizes[:, 0].sum()),
        "rejected_bytes": int(sizes[:, 1].sum()),
        "after": metrics(scores, sizes, after_reward),
        "precision": "bf16" if bf16 else "fp32",
        "seconds": round(seconds, 2),
    }
    if has_reference:
        ref_scores = np.concatenate([reference, scores[:, 2:]], axis=1)
        zero = (np.zeros(len(pairs)), np.zeros(len(pairs)))
        before_reward = zero if objective in ("dpo", "ipo") else rewards(ref_scores, reference, objective, beta)
        result["before"] = metrics(ref_scores, sizes, before_reward)
        if objective in ("dpo", "ipo"):
            result["before"]["reward_accuracy"] = None  # every reward is 0: no pair is preferred yet
    out_dir.mkdir(parents=True, exist_ok=True)
    n_samples = cfg.max_answers if cfg.samples else 0
    samples = generated(lm, tok, pairs, packed.names(pairs), generate_cfg, n_samples, model_name, out_dir)
    described = f"{len(pairs):,} held-out preference pairs ({int(pairs.stored_tokens.sum()):,} tokens)"
    record = eval_record(model_name, described, result, samples)
    write_json(out_dir / "eval.json", record)
    write_atomic(out_dir / "eval.md", pairs_markdown(record))
    say(_summary(record, out_dir))
    return record


def _summary(record: dict, out_dir) -> str:
    after, before = record["after"], record.get("before")
    was = f" (before {before['accuracy']:.1%})" if before else ""
    bits = f"chosen {after['chosen_bits_per_byte']:.4f}, rejected {after['rejected_bits_per_byte']:.4f} bits per byte"
    where = out_dir / "eval.json"
    return f"preference accuracy {after['accuracy']:.1%}{was}, {bits} ({record['pairs']:,} pairs); results in {where}"
