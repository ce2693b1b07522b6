"""The evaluator of prepared data, as finetune runs it at the end and `hftextgen evaluate` runs it:
task data's held-out answers scored given their prompts (answers.py), preference pairs before and
after (preference.py), else its documents (run.py)."""

from __future__ import annotations

from pathlib import Path

from ..generate import read_prompts
from .answers import evaluate_answers
from .run import evaluate_documents


def evaluate_prepared(
    lm, tok, prepared, split: str, *, cfg, generate_cfg, out_dir: Path, model_name: str, preference=None
) -> dict:
    """Score `split` of one source's prepared data (data.prepare; a mixture's `evaluated`), write
    eval.json, eval.md and the samples into out_dir, and return the results. Preference pairs:
    their held-out ones, before and after, for `preference` (the recipe's section)."""
    if getattr(prepared, "pairs", False):
        from ..errors import UserError
        from .preference import evaluate_pairs

        if split != "validation":
            raise UserError(f"evaluate.split={split}: preference pairs are scored on the held-out ones: drop it")
        return evaluate_pairs(
            lm, tok, prepared, cfg=cfg, generate_cfg=generate_cfg, preference=preference, out_dir=out_dir,
            model_name=model_name,
        )  # fmt: skip
    if prepared.task:  # prompts and answers: the answers scored given their prompts
        return evaluate_answers(
            lm, tok, prepared, split, cfg=cfg, generate_cfg=generate_cfg, out_dir=out_dir, model_name=model_name
        )
    return evaluate_documents(
        lm,
        tok,
        # data.max_eval_tokens of the documents; split all: prepared with none held out, all in train
        prepared.eval_documents("train" if split == "all" else split),
        data=prepared.cfg,
        cfg=cfg,
        generate_cfg=generate_cfg,
        prompts=read_prompts(generate_cfg),
        out_dir=out_dir,
        model_name=model_name,
    )
