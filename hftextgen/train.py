"""Train stage: a stock transformers.Trainer (AdamW) over packed blocks, and the run directory.

The run directory (train.output_dir) ends up holding:
  model.safetensors, config.json, generation_config.json, tokenizer files   stock-loadable model
  recipe.yaml             the resolved recipe: re-run it with `hftextgen finetune --config`
  data_report.json        documents, characters, tokens, blocks, dropped tail per split
  validation_documents.json   ids of the held-out documents
  run_info.json           versions, device, precision, effective batch, parameters
  train_results.json, eval_results.json, all_results.json, trainer_state.json   metrics
  checkpoint-N/           Trainer checkpoints (the newest save_total_limit)
  tensorboard/            TensorBoard events (train.report_to includes tensorboard)
  loss.png, README.md     the loss curves and a Hugging Face model card (report.py)
"""

from __future__ import annotations

import ctypes
import datetime
import json
import logging
import sys
import warnings
from pathlib import Path

import datasets
import torch
import transformers
from transformers import Trainer, TrainerCallback, set_seed

from . import (
    __version__,
    callbacks,
    data,
    evaluation,
    fused_loss,
    generate,
    hub,
    model,
    progress,
    report,
    safety,
    tokenizer,
)
from .callbacks import perplexity
from .config import Recipe
from .errors import UserError
from .files import append_lines, write_atomic, write_json


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


def resolve_resume(value: str | None, output_dir: Path, needs_optimizer: bool = True, main: bool = True) -> str | None:
    """train.resume_from_checkpoint: unset, `last` (the newest complete checkpoint-N in
    output_dir; newer incomplete ones are skipped, and said so), or a checkpoint folder."""
    if value is None or value.lower() in ("", "false", "no"):
        return None
    if value.lower() in ("last", "latest", "true"):
        last, skipped = safety.newest_complete(output_dir, needs_optimizer)
        if main:
            for folder, problem in skipped:
                safety.warn(f"{folder} is incomplete or damaged ({problem}): skipped")
        if last is not None:
            return str(last)
        if skipped:
            folder, problem = skipped[0]
            raise UserError(
                f"train.resume_from_checkpoint={value}: {output_dir} holds no complete checkpoint ({folder.name}: "
                f"{problem}): start the run over with --train.overwrite_output_dir true instead"
            )
        if output_dir.is_dir() and any(output_dir.iterdir()):
            raise UserError(
                f"train.resume_from_checkpoint={value}: {output_dir} holds no checkpoint-N folder to resume from "
                f"(the run stopped before its first save): start it over with --train.overwrite_output_dir true instead"
            )
        raise UserError(
            f"train.resume_from_checkpoint={value}: {output_dir} holds no checkpoint-N folder to resume from: "
            f"drop the option to start a new run"
        )
    path = Path(value)
    step = safety.checkpoint_step(path)
    if step is None and not (path / "trainer_state.json").is_file():
        raise UserError(
            f"train.resume_from_checkpoint: {value} is not a Trainer checkpoint (no trainer_state.json): "
            f"give a checkpoint-N folder, or `last`"
        )
    if not path.is_dir():
        raise UserError(f"train.resume_from_checkpoint: no such folder: {value}: give a checkpoint-N folder, or `last`")
    problem = safety.checkpoint_problem(path, needs_optimizer)
    if problem:
        earlier = [c for c in safety.checkpoints(path.parent) if step is None or safety.checkpoint_step(c) < step]
        good = next((c for c in earlier if safety.checkpoint_problem(c, needs_optimizer) is None), None)
        instead = f"resume from {good} instead" if good else "no earlier checkpoint is complete: start the run over"
        raise UserError(f"train.resume_from_checkpoint: {value} is incomplete or damaged ({problem}): {instead}")
    return value


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool = False) -> None:
    """A run directory that holds anything is never written into, unless the run continues
    (resume) or is started over on request (overwrite: only a folder that looks like a run)."""
    if resuming or not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError(f"train.output_dir: {output_dir} is a file: choose a directory")
    present = sorted(p.name for p in output_dir.iterdir())
    if present and overwrite and not safety.looks_like_run(output_dir):
        raise UserError(
            f"train.overwrite_output_dir: {output_dir} does not look like a run directory (no "
            f"{', '.join(safety.RUN_MARKERS)} or checkpoint-N inside), and only runs are deleted: choose another "
            f"--train.output_dir"
        )
    if present and not overwrite:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise UserError(
            f"train.output_dir: {output_dir} is not empty ({shown}): continue that run with "
            f"--train.resume_from_checkpoint last, start it over with --train.overwrite_output_dir true, or "
            f"choose another --train.output_dir"
        )


def preflight(recipe: Recipe) -> str | None:
    """The checks that stop a run before any work (finetune and validate make the same ones).
    Returns the checkpoint to resume from, if any."""
    args = recipe.train
    output_dir = Path(args.output_dir)
    resume = resolve_resume(args.resume_from_checkpoint, output_dir, not args.save_only_model, args.process_index == 0)
    check_output_dir(output_dir, resume is not None, args.overwrite_output_dir)
    model.check_source(recipe.model)
    if "tensorboard" in args.report_to and not callbacks.tensorboard_available():
        raise UserError(
            "train.report_to includes tensorboard, which is not installed: pip install tensorboard, or set "
            "train.report_to none"
        )
    hub.check_push(args)
    return resume


def finetune(recipe: Recipe, resolved_yaml: str | None = None, command: list[str] | None = None) -> dict:
    """Run a recipe end to end; returns the final train and eval metrics. `command`: the
    arguments of `hftextgen finetune`, to say how to continue a run that is stopped."""
    args = recipe.train
    output_dir = Path(args.output_dir)
    resume = preflight(recipe)
    main = args.process_index == 0
    if not main:
        quiet_replica(args)

    def say(*lines: str) -> None:
        if main:
            print(*lines, sep="\n", flush=True)

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
    if resume is not None:
        safety.check_same_model(Path(resume), lm)
    tok.model_max_length = model.context_length(lm)  # saved with the run: pipelines read it
    args.disable_tqdm = progress.mode() != "bars"  # the progress display is callbacks.install's
    if args.fused_loss and not fused_loss.install(lm):
        say("train.fused_loss: only GPT-2 models have it; this one trains with the stock loss")
    trainer = Trainer(
        model=lm,
        args=args,
        data_collator=collate_blocks,
        train_dataset=packed.train,
        eval_dataset=packed.eval_blocks,  # data.max_eval_tokens of the validation blocks
        processing_class=tok,
    )
    info = run_info(recipe, lm, packed)
    validation = packed.report["validation"]
    tensorboard = callbacks.install(
        trainer,
        tokens_per_step=info["tokens_per_step"],
        tokens_per_byte=validation["tokens"] / validation["bytes"] if validation.get("bytes") else None,
        log_dir=output_dir / "tensorboard",
    )
    if recipe.evaluate.sample_every and not trainer.is_fsdp_enabled:  # FSDP: rank 0 can't generate alone
        trainer.add_callback(SamplesCallback(recipe, tok, output_dir / "training_samples.jsonl", tensorboard))
    say(
        f"model: {info['parameters']:,} parameters; precision {info['precision']} on {info['device']}",
        f"batch: {info['effective_batch_size']} blocks = {info['per_device_batch_size']} per device x "
        f"{info['processes']} processes x {info['gradient_accumulation_steps']} accumulation "
        f"({info['tokens_per_step']:,} tokens per step)",
    )
    if main:
        low_disk = safety.disk_warning(
            output_dir, info["parameters"], safety.planned_saves(args, len(packed.train)), args.save_total_limit
        )
        if low_disk:
            safety.warn(low_disk)
        if args.overwrite_output_dir and output_dir.is_dir() and any(output_dir.iterdir()):
            # Only now, with the data and model ready: a mistake in the recipe deletes nothing.
            safety.clear_run(output_dir)
            say(f"train.overwrite_output_dir: deleted the earlier run in {output_dir}")
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None and resolved_yaml is not None and (output_dir / "recipe.yaml").is_file():
            for note in safety.changed_on_resume(
                (output_dir / "recipe.yaml").read_text(encoding="utf-8"), resolved_yaml
            ):
                safety.warn(note)
        if resolved_yaml is not None:
            header = (
                f"# hftextgen finetune --config {output_dir / 'recipe.yaml'} --train.output_dir NEW_DIR\n"
                f"# The resolved recipe of this run: every key, defaults included.\n"
            )
            write_atomic(output_dir / "recipe.yaml", header + resolved_yaml)
        write_json(output_dir / "data_report.json", packed.report)
        write_json(output_dir / "validation_documents.json", packed.validation_ids)
        write_json(output_dir / "run_info.json", info)

    result = safety.train(trainer, resume, output_dir, command)
    if trainer.is_fsdp_enabled:
        # Checkpoints may stay sharded (launch/fsdp.yaml), but the run directory must load with
        # from_pretrained: gather the whole model for the final save (Trainer saves nothing here
        # with a sharded state dict).
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    safety.save_final_model(trainer, output_dir)
    metrics = dict(result.metrics)
    metrics["train_tokens_per_second"] = round(metrics["train_samples_per_second"] * recipe.data.block_size, 1)
    metrics["train_tokens"] = trainer.state.global_step * info["tokens_per_step"]
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    eval_metrics = last_evaluation(trainer) or trainer.evaluate()
    eval_metrics["eval_perplexity"] = perplexity(eval_metrics["eval_loss"])
    trainer.save_metrics("eval", eval_metrics)
    say(
        f"held-out loss {eval_metrics['eval_loss']:.4f}, perplexity {eval_metrics['eval_perplexity']:.2f} "
        f"over packed blocks ({packed.eval_blocks.n_tokens:,} of {packed.report['validation']['tokens']:,} "
        f"validation tokens)"
    )
    if recipe.evaluate.at_end_of_training and trainer.is_fsdp_enabled:
        # The sharded model needs every process for a forward pass; the saved one does not.
        say(f"evaluation: run `hftextgen evaluate --model {output_dir}` (not run inside an FSDP job)")
    elif recipe.evaluate.at_end_of_training and main:
        scores = evaluate_run(recipe, trainer.model, tok, packed, output_dir)
        eval_metrics.update({f"eval_{k}": scores[k] for k in ("bits_per_byte", "word_perplexity")})
        if tensorboard is not None:
            final = {f"final/{k}": scores[k] for k in ("perplexity", "bits_per_byte", "word_perplexity", "loss")}
            tensorboard.log_final(trainer.state.global_step, final, {"final/samples": samples_text(output_dir)})
    if main:
        model_id = trainer.hub_model_id if args.push_to_hub else None
        written = report.write(output_dir, model_id=model_id)
        say(f"report: {', '.join(str(p) for p in written)}")
    if args.push_to_hub and main:
        say(f"pushed to https://huggingface.co/{hub.push_run(trainer, output_dir)}")
    say(f"run directory: {output_dir}")
    return {**metrics, **eval_metrics}


def evaluate_run(recipe: Recipe, lm, tok, packed: data.Packed, output_dir: Path) -> dict:
    """The generation evaluator on the held-out documents: what `hftextgen evaluate` on the run
    directory computes."""
    was_training = lm.training
    lm.eval()
    try:
        return evaluation.run(
            lm,
            tok,
            packed.eval_documents("validation"),  # data.max_eval_tokens of the held-out documents
            data=recipe.data,
            cfg=recipe.evaluate,
            generate_cfg=recipe.generate,
            prompts=generate.read_prompts(recipe.generate),
            out_dir=Path(recipe.evaluate.output_dir or output_dir),
            model_name=str(output_dir),
        )
    finally:
        lm.train(was_training)


class SamplesCallback(TrainerCallback):
    """Every `evaluate.sample_every` steps, print samples of the generate prompts and append them
    to training_samples.jsonl (and to TensorBoard's text tab), so a long run shows its text
    improving."""

    def __init__(self, recipe: Recipe, tok, path: Path, tensorboard: callbacks.TensorBoard | None = None):
        self.recipe, self.tok, self.path = recipe, tok, path
        self.tensorboard = tensorboard
        self.prompts = generate.read_prompts(recipe.generate)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.recipe.evaluate.sample_every or not state.is_world_process_zero:
            return
        was_training = model.training
        model.eval()
        try:
            generator = generate.Generator(model, self.tok, self.recipe.generate)
            samples = generator(self.prompts)
        finally:
            model.train(was_training)
        run = str(self.path.parent)
        append_lines(self.path, [json.dumps({"step": state.global_step, **generator.record(s, run)}) for s in samples])
        shown = [f"  {(sample.prompt + sample.completion)[:300]!r}" for sample in samples[:3]]
        progress.write("\n".join([f"samples at step {state.global_step}:", *shown]))
        if self.tensorboard is not None:
            self.tensorboard.add_text(
                "samples", tensorboard_text(s.prompt + s.completion for s in samples), state.global_step
            )


def tensorboard_text(texts) -> str:
    """Samples as TensorBoard markdown: each an indented block, so its line breaks survive."""
    return "\n\n---\n\n".join("\n".join("    " + line for line in text.splitlines() or [""]) for text in texts)


def samples_text(output_dir: Path) -> str:
    path = output_dir / "samples.jsonl"
    if not path.is_file():
        return ""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tensorboard_text(r["prompt"] + r["completion"] for r in records)


def quiet_replica(args) -> None:
    """Under several processes every one runs the same code, so whatever a replica would print
    the first process prints too: replicas keep errors only (train.log_level_replica, `error` by
    default), without progress bars."""
    level = args.get_process_log_level()
    transformers.utils.logging.set_verbosity(level)
    if level > logging.WARNING:
        warnings.simplefilter("ignore")
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


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
