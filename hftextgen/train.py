"""Train stage: a stock transformers.Trainer (AdamW) over packed blocks, and the run directory.

The run directory (train.output_dir) ends up holding:
  model.safetensors, config.json, generation_config.json, tokenizer files   stock-loadable model
  recipe.yaml             the resolved recipe: re-run it with `hftextgen finetune --config`
  data_report.json        documents, characters, tokens, blocks, dropped tail per split
  validation_documents.json   ids of the held-out documents
  run_info.json           versions, device, precision, effective batch, parameters
  train_results.json, eval_results.json, all_results.json, trainer_state.json   metrics
  checkpoint-N/           Trainer checkpoints (the newest save_total_limit)
"""

from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import Trainer, set_seed
from transformers.trainer_utils import get_last_checkpoint

from . import __version__, data, fused_loss, model, tokenizer
from .config import Recipe
from .errors import UserError


def reuse_freed_memory() -> None:
    """Keep freed memory in the process (glibc only) instead of returning it to the OS.

    Every step allocates the logits anew: batch x block x vocab floats, ~100 MB and more for
    GPT-2's 50k vocabulary. glibc serves such sizes with fresh mmaps and unmaps them on free, so
    each step pays page faults on hundreds of MB; on a 2-core CPU that made training 2.5x slower.
    Turning off mmap for large blocks and trimming keeps the memory for reuse.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack packed blocks. Labels are the inputs (the model shifts them): no padding and no
    masking, so EOS stays a target and the model learns to end documents."""
    input_ids = torch.stack([e["input_ids"] for e in examples])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def resolve_resume(value: str | None, output_dir: Path) -> str | None:
    """train.resume_from_checkpoint: unset, `last` (the newest checkpoint-N in output_dir), or a path."""
    if value is None or value.lower() in ("", "false", "no"):
        return None
    if value.lower() in ("last", "latest", "true"):
        last = get_last_checkpoint(output_dir) if output_dir.is_dir() else None
        if last is None:
            raise UserError(
                f"train.resume_from_checkpoint={value}: {output_dir} holds no checkpoint-N folder to resume "
                f"from: drop the option to start a new run"
            )
        return last
    if not (Path(value) / "trainer_state.json").is_file():
        raise UserError(
            f"train.resume_from_checkpoint: {value} is not a Trainer checkpoint (no trainer_state.json): "
            f"give a checkpoint-N folder, or `last`"
        )
    return value


def check_output_dir(output_dir: Path, resuming: bool) -> None:
    if resuming or not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"train.output_dir: {output_dir} is a file: choose a directory")
    present = sorted(p.name for p in output_dir.iterdir())
    if present:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise UserError(
            f"train.output_dir: {output_dir} is not empty ({shown}): continue that run with "
            f"--train.resume_from_checkpoint last, or choose another --train.output_dir (or delete it)"
        )


def finetune(recipe: Recipe, resolved_yaml: str | None = None) -> dict:
    """Run a recipe end to end; returns the final train and eval metrics."""
    args = recipe.train
    output_dir = Path(args.output_dir)
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    check_output_dir(output_dir, resume is not None)
    main = args.process_index == 0

    def say(*lines: str) -> None:
        if main:
            print(*lines, sep="\n", flush=True)

    model.check_source(recipe.model)
    reuse_freed_memory()
    set_seed(args.seed)
    corpus = data.Corpus(recipe.data)
    with args.main_process_first(desc="preprocessing"):
        tok = tokenizer.build_tokenizer(recipe, corpus)
        packed = data.prepare(corpus, tok, tokenizer.fingerprint(tok))
    say(
        f"data: {'cached' if packed.cache_hit else 'prepared'} at {packed.cache_path}",
        data.format_report(packed.report),
    )

    lm = model.build_model(recipe.model, tok, recipe.data.block_size)
    tok.model_max_length = model.context_length(lm)  # saved with the run: pipelines read it
    if args.fused_loss and not fused_loss.install(lm):
        say("train.fused_loss: only GPT-2 models have it; this one trains with the stock loss")
    trainer = Trainer(
        model=lm,
        args=args,
        data_collator=collate_blocks,
        train_dataset=packed.train,
        eval_dataset=packed.validation,
        processing_class=tok,
    )
    info = run_info(recipe, lm, packed)
    say(
        f"model: {info['parameters']:,} parameters; precision {info['precision']} on {info['device']}",
        f"batch: {info['effective_batch_size']} blocks = {info['per_device_batch_size']} per device x "
        f"{info['processes']} processes x {info['gradient_accumulation_steps']} accumulation "
        f"({info['tokens_per_step']:,} tokens per step)",
    )
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resolved_yaml is not None:
            header = (
                f"# hftextgen finetune --config {output_dir / 'recipe.yaml'} --train.output_dir NEW_DIR\n"
                f"# The resolved recipe of this run: every key, defaults included.\n"
            )
            write_atomic(output_dir / "recipe.yaml", header + resolved_yaml)
        write_atomic(output_dir / "data_report.json", json.dumps(packed.report, indent=2))
        write_atomic(output_dir / "validation_documents.json", json.dumps(packed.validation_ids, indent=1))
        write_atomic(output_dir / "run_info.json", json.dumps(info, indent=2))

    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    metrics = dict(result.metrics)
    metrics["train_tokens_per_second"] = round(metrics["train_samples_per_second"] * recipe.data.block_size, 1)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    eval_metrics = last_evaluation(trainer) or trainer.evaluate()
    eval_metrics["eval_perplexity"] = perplexity(eval_metrics["eval_loss"])
    trainer.save_metrics("eval", eval_metrics)
    say(
        f"held-out loss {eval_metrics['eval_loss']:.4f}, perplexity {eval_metrics['eval_perplexity']:.2f} "
        f"({packed.report['validation']['tokens']:,} validation tokens)",
        f"run directory: {output_dir}",
    )
    return {**metrics, **eval_metrics}


def last_evaluation(trainer: Trainer) -> dict | None:
    """The metrics of an evaluation already run at the final step, so it is not run twice.
    None when there is none, or when the best checkpoint replaced the final weights."""
    if trainer.args.load_best_model_at_end:
        return None
    state = trainer.state
    for entry in reversed(state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == state.global_step:
                return {k: v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"}
            return None
    return None


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def run_info(recipe: Recipe, lm, packed: data.Packed) -> dict:
    args = recipe.train
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    effective = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return {
        "hftextgen": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(args.device),
        "precision": precision,
        "parameters": lm.num_parameters(),
        "per_device_batch_size": args.per_device_train_batch_size,
        "processes": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "effective_batch_size": effective,
        "tokens_per_step": effective * recipe.data.block_size,
        "data_cache": str(packed.cache_path),
    }
