"""Train stage: `hftextgen finetune`, a recipe run end to end on a stock Trainer (AdamW).

`finetune` reads as its steps: the checks before any work, the tokenizer, data and model
(setup.py), a Trainer with the run's callbacks, the run directory (rundir.py), training under
the guards (guards.py), the final model and metrics, the evaluator on the held-out documents,
and the model card (card.py). What the run directory ends up holding is listed in the README.
"""

from __future__ import annotations

from pathlib import Path

from transformers import EarlyStoppingCallback, Trainer, set_seed

from .. import data, evaluate, hub, runtime
from ..config import Recipe
from ..errors import warn
from . import callbacks, card, guards, rundir, setup
from . import preference as preference_stage
from .callbacks import perplexity
from .schedule import schedule_of


def finetune_recipe(recipe: Recipe, resolved_yaml: str | None = None, command: list[str] | None = None) -> dict:
    """Run a recipe end to end; returns the final train and eval metrics. `resolved_yaml`: the
    recipe as saved in the run directory; `command`: the arguments of `hftextgen finetune`, to
    say how to continue a run that is stopped."""
    args = recipe.train
    output_dir = Path(args.output_dir)
    main = args.process_index == 0
    say = print if main else lambda *lines, **kw: None

    resume = setup.preflight(recipe)
    if not main:
        runtime.quiet_replica(args)
    runtime.reuse_freed_memory()
    set_seed(args.seed)

    built = setup.build(recipe)
    prepared = built.prepared
    say(f"data: {'cached' if prepared.cache_hit else 'prepared'} at {prepared.cache_path}", flush=True)
    say(data.describe_report(prepared.report), flush=True)
    if resume is not None:
        rundir.check_same_model(Path(resume), built.lm)
    trainer, tensorboard = setup_trainer(recipe, built)
    info = setup.run_info(recipe, built)
    say(describe_run(info), flush=True)
    if main:
        start_run_dir(recipe, built, info, resume, resolved_yaml)

    result = guards.fit(trainer, resume, output_dir, command)
    metrics = save_final(trainer, result, recipe)
    metrics.update(held_out_loss(trainer, prepared, say))
    instead = f"the model is saved in {output_dir}: run `hftextgen evaluate --model {output_dir}`"
    with guards.interruptible("the final evaluation", instead):
        if recipe.evaluate.at_end_of_training:
            metrics.update(evaluate_at_end(recipe, trainer, built, tensorboard, say))
        if main:
            publish(trainer, output_dir, say)
    return metrics


def setup_trainer(recipe: Recipe, built: setup.Built) -> tuple[Trainer, callbacks.TensorBoard | None]:
    """The stock Trainer with the run's metrics, progress display, TensorBoard and samples."""
    trainer = setup.make_trainer(built, recipe.train)
    validation = built.prepared.report["validation"]
    output_dir = Path(recipe.train.output_dir)
    language_model = built.preference is None  # a preference loss is no perplexity
    tensorboard = callbacks.install(
        trainer,
        tokens_per_step=setup.tokens_per_step(recipe, built),
        # Task data: the loss is over the trained tokens (the answers, or every token), and the
        # bytes are those of the text they hold.
        tokens_per_byte=validation.get("trained_tokens", validation["tokens"])
        / validation.get("trained_bytes", validation["bytes"])
        if validation.get("trained_bytes", validation.get("bytes")) and language_model
        else None,
        log_dir=output_dir / "tensorboard",
        perplexity=language_model,
    )
    if recipe.train.early_stopping_patience is not None:
        trainer.add_callback(
            EarlyStoppingCallback(recipe.train.early_stopping_patience, recipe.train.early_stopping_threshold)
        )
    every = recipe.evaluate.sample_every
    if every and not trainer.is_fsdp_enabled:  # FSDP: rank 0 can't generate alone
        path = output_dir / "training_samples.jsonl"
        trainer.add_callback(callbacks.Samples(every, recipe.generate, built.tok, path, tensorboard))
    return trainer, tensorboard


def describe_run(info: dict) -> str:
    trainable = info["trainable_parameters"]
    share = f" ({trainable:,} trained: {trainable / info['parameters']:.2%})" if trainable < info["parameters"] else ""
    return (
        f"model: {info['parameters']:,} parameters{share}; precision {info['precision']} on {info['device']}\n"
        + setup.describe_batch(info)
    )


def start_run_dir(recipe: Recipe, built: setup.Built, info: dict, resume: str | None, resolved_yaml: str | None):
    """Warn when the disk looks too small, then make the run directory ready (main process)."""
    args = recipe.train
    output_dir = Path(args.output_dir)
    schedule = schedule_of(args, len(built.prepared.train))
    low_disk = rundir.disk_warning(
        output_dir, info["parameters"], schedule.saves, args.save_total_limit, info["trainable_parameters"]
    )
    if low_disk:
        warn(low_disk)
    files = {
        "data_report.json": built.prepared.report,
        "validation_documents.json": built.prepared.validation_ids,
        "run_info.json": info,
    }
    rundir.start(output_dir, args.overwrite_output_dir, resume, resolved_yaml, files)


def save_final(trainer: Trainer, result, recipe: Recipe) -> dict:
    """The final model, atomically, and the training metrics."""
    if trainer.is_fsdp_enabled:
        # Checkpoints may stay sharded (launch/fsdp.yaml), but the run directory must load with
        # from_pretrained: gather the whole model for the final save (Trainer saves nothing here
        # with a sharded state dict).
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    rundir.save_final_model(trainer, Path(recipe.train.output_dir))
    metrics = dict(result.metrics)
    # Real tokens (no padding), as RunMetrics counts them: this session's over its runtime, and
    # the run's so far.
    counted = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, callbacks.RunMetrics))
    metrics["train_tokens_per_second"] = round(counted.session_tokens / max(metrics["train_runtime"], 1e-9), 1)
    metrics["train_tokens"] = trainer.state.num_input_tokens_seen
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def held_out_loss(trainer: Trainer, prepared: data.Prepared | data.Mixture | data.PreparedPairs, say) -> dict:
    """The Trainer's held-out loss of the final model over the validation blocks it evaluates
    (data.max_eval_tokens of them): the evaluation at the final step when one ran, else a new one."""
    metrics = last_evaluation(trainer) or trainer.evaluate()
    if getattr(prepared, "pairs", False):
        return preference_stage.held_out(trainer, prepared, metrics, say)
    metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    trainer.save_metrics("eval", metrics)
    say(
        f"held-out loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f} "
        f"over packed blocks ({prepared.eval_items.n_tokens:,} of {prepared.report['validation']['tokens']:,} "
        f"validation tokens)",
        flush=True,
    )
    return metrics


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


def evaluate_at_end(recipe: Recipe, trainer: Trainer, built: setup.Built, tensorboard, say) -> dict:
    """The generation evaluator on the held-out data (main process): eval.json, samples, and the
    final figures in TensorBoard."""
    output_dir = Path(recipe.train.output_dir)
    if trainer.is_fsdp_enabled:
        # The sharded model needs every process for a forward pass; the saved one does not.
        say(f"evaluation: run `hftextgen evaluate --model {output_dir}` (not run inside an FSDP job)", flush=True)
        return {}
    if trainer.args.process_index != 0:
        return {}
    cfg = recipe.evaluate
    # What `hftextgen evaluate` on the run directory computes; a mixture: the source its data
    # report names.
    with runtime.eval_mode(trainer.model):
        scores = evaluate.evaluate_prepared(
            trainer.model,
            built.tok,
            built.prepared.evaluated,
            "validation",
            cfg=cfg,
            generate_cfg=recipe.generate,
            out_dir=Path(cfg.output_dir or output_dir),
            model_name=str(output_dir),
            preference=recipe.preference,
        )
    if built.preference is not None:
        return preference_stage.final_figures(scores, trainer.state.global_step, tensorboard, output_dir)
    names = [k for k in ("perplexity", "bits_per_byte", "word_perplexity", "loss") if k in scores]
    if tensorboard is not None:
        final = {f"final/{k}": scores[k] for k in names}
        samples = {"final/samples": callbacks.samples_text(output_dir)}
        tensorboard.log_final(trainer.state.global_step, final, samples)
    return {f"eval_{k}": scores[k] for k in names if k in ("bits_per_byte", "word_perplexity")}


def publish(trainer: Trainer, output_dir: Path, say) -> None:
    """loss.png and the model card, then the upload when train.push_to_hub asks for it."""
    args = trainer.args
    written = card.write(output_dir, model_id=trainer.hub_model_id if args.push_to_hub else None)
    say(f"model card: {', '.join(str(p) for p in written)}", flush=True)
    if args.push_to_hub:
        say(f"pushed to https://huggingface.co/{hub.push_run(trainer, output_dir)}", flush=True)
    say(f"run directory: {output_dir}", flush=True)
