"""Task fine-tuning: `hftextgen finetune` vs TRL's SFTTrainer on the dialogue recipe's data, real
tokens/s, peak memory and held-out answer loss.

    python -m bench.trl_sft [--quick] [--steps N] [--repeats N] [--trl-packing true|false] [--out FILE]

Data: recipes/shakespeare/dialogue.yaml's task data, each speech of the plays answering the one
before it as a conversation ({"messages": [user, assistant]}), the training plays' examples.
hftextgen runs the recipe as it ships (its 4,096-token BPE trained on the plays, its chat
template, rows of 256 tokens with the examples isolated, 8 rows a step) for --steps steps. TRL
(the baseline) gets what that run saved: the same tokenizer and chat template (its
tokenizer_config and chat_template.jinja), the same model (the run's config.json, from scratch,
the same seed), the same optimizer and schedule (the recipe's resolved train section: AdamW,
learning rate, betas, weight decay, warm-up, cosine, clipping, bf16 as the run chose it), the
same steps and batch: SFTConfig(packing=True, max_length=256, 8 rows a step, the loss on the
assistant turns (assistant_only_loss, which the template's generation marks allow), gradient
checkpointing off as hftextgen trains). --trl-packing false gives TRL one padded conversation
a row instead. TRL keeps the records whose templated tokens fit 256 (hftextgen cuts long
prompts from the left and drops long answers: the two training sets differ by ~1.6%, said in
the JSON); both read them in their own shuffled order.

Each training run is a child process of its own, one after the other (--repeats alternates
them): real tokens/s = the tokens of the batches trained, padding never (hftextgen:
train_results.json's train_tokens; TRL: counted from its collated batches) over the Trainer's
train_runtime, which leaves out start-up and TRL's tokenizing; peak RSS = the child's
ru_maxrss (everything it did: hftextgen reads data prepared beforehand by `hftextgen prepare`,
memory-mapped; TRL tokenizes and packs its dataset in memory, as it does). Then both saved models
are scored by the same evaluator, `hftextgen evaluate` with the hftextgen run's recipe: the
held-out plays' 1,396 answers given their prompts, nats per answer token (and bits/byte).
TRL is a dev dependency (pyproject's dev extra): nothing in the package imports it.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import common

RECIPE = common.ROOT / "recipes/shakespeare/dialogue.yaml"
STEPS, QUICK_STEPS = 200, 12
# The recipe's train keys that TRL's SFTConfig (a TrainingArguments) takes as they are.
SAME_KEYS = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args", "seed", "data_seed",
    "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
)  # fmt: skip


def hftextgen_run(config: dict) -> dict:
    """Child: the recipe for `steps` steps, no evaluation; its real tokens and runtime."""
    from hftextgen import cli

    run = Path(config["run"])
    code = cli.main(
        ["finetune", "--config", str(RECIPE), "--train.max_steps", str(config["steps"]), "--train.output_dir",
         str(run), "--data.cache_dir", config["cache"], "--train.eval_strategy", "no", "--train.save_strategy", "no",
         "--evaluate.at_end_of_training", "false", "--progress", "quiet"]
    )  # fmt: skip
    if code:
        raise SystemExit(f"hftextgen finetune exited with {code}")
    results = json.loads((run / "train_results.json").read_text())
    return {"real_tokens": results["train_tokens"], "train_runtime": results["train_runtime"]}


def conversations(limit: int | None = None) -> list[dict]:
    """The training plays' conversations, as the dialogue recipe reads them."""
    from hftextgen.data import Corpus, DataConfig, sources

    corpus = Corpus(DataConfig(source="shakespeare", format="messages"))
    segments, _, _ = corpus.segments(False)
    found = [json.loads(r.text) for seg, r in sources.read_all(segments, corpus.resolved) if seg.split == "train"]
    return found[:limit]


class BatchTokens:
    """TRL's collator, counting the real tokens of every batch it makes (its only batches here:
    no evaluation runs)."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        mask = batch.get("attention_mask")
        self.batches.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch


def trl_config(config: dict, reference: Path):
    """SFTConfig with the hftextgen run's optimizer, schedule, batch, steps and precision."""
    import yaml
    from trl import SFTConfig

    train = yaml.safe_load((reference / "recipe.yaml").read_text())["train"]
    info = json.loads((reference / "run_info.json").read_text())
    same = {key: train[key] for key in SAME_KEYS if train.get(key) is not None}
    return SFTConfig(
        output_dir=config["run"], max_steps=config["steps"], bf16=info["precision"] == "bf16", use_cpu=True,
        packing=config["packing"], max_length=256, assistant_only_loss=True, gradient_checkpointing=False,
        report_to="none", save_strategy="no", eval_strategy="no", dataloader_pin_memory=False, disable_tqdm=True,
        **same,
    )  # fmt: skip


def trl_run(config: dict) -> dict:
    """Child: TRL's SFTTrainer on the same conversations, tokenizer, template, model and settings."""
    import datasets
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTTrainer

    reference = Path(config["reference"])
    tok = AutoTokenizer.from_pretrained(reference)
    records = conversations(config.get("limit"))
    kept = [r for r in records if len(tok.apply_chat_template(r["messages"], tokenize=True)) <= 256]
    args = trl_config(config, reference)
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(reference), attn_implementation="sdpa")
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(kept), processing_class=tok)
    counted = trainer.data_collator = BatchTokens(trainer.data_collator)
    metrics = trainer.train().metrics
    trainer.save_model(config["run"])
    tok.save_pretrained(config["run"])
    micro = config["steps"] * args.gradient_accumulation_steps  # the loader reads a batch ahead
    return {
        "real_tokens": sum(counted.batches[:micro]),
        "train_runtime": metrics["train_runtime"],
        "examples": len(kept),
        "examples_dropped_over_256": len(records) - len(kept),
    }


def child(config: dict) -> dict:
    started = time.perf_counter()
    result = (hftextgen_run if config["kind"] == "hftextgen" else trl_run)(config)
    result["child_s"] = time.perf_counter() - started
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    result["real_tokens_per_s"] = result["real_tokens"] / result["train_runtime"]
    return result


def answer_loss(model_dir: Path, reference: Path, cache: str) -> dict:
    """The held-out answers' loss of a saved model, by hftextgen's evaluator with the reference
    run's recipe (the same answers for every model)."""
    out = model_dir / "held-out"
    if model_dir != reference:  # evaluate takes its data and scoring from the model's recipe.yaml
        shutil.copy(reference / "recipe.yaml", model_dir / "recipe.yaml")
    cmd = [sys.executable, "-m", "hftextgen", "evaluate", "--model", str(model_dir), "--data.cache_dir", cache,
           "--evaluate.max_answers", "0", "--evaluate.output_dir", str(out), "--progress", "quiet"]  # fmt: skip
    if common.run_command(cmd) != 0:
        raise SystemExit(f"hftextgen evaluate failed on {model_dir}")
    scores = json.loads((out / "eval.json").read_text())
    return {key: scores[key] for key in ("loss", "bits_per_byte", "answers", "answer_tokens")}


def measure(args, folder: Path, steps: int) -> dict[str, list[dict]]:
    """Every repeat: hftextgen, then TRL on what that hftextgen run saved; both scored."""
    cache = str(folder / "cache")
    prepare = [sys.executable, "-m", "hftextgen", "prepare", "--config", str(RECIPE), "--data.cache_dir", cache]
    if common.run_command(prepare) != 0:
        raise SystemExit("hftextgen prepare failed")
    results: dict[str, list[dict]] = {"hftextgen": [], "trl": []}
    for i in range(args.repeats):
        ours = folder / f"hftextgen-{i}"
        base = {"steps": steps, "cache": cache, "limit": 2000 if args.quick else None}
        runs = {
            "hftextgen": {"kind": "hftextgen", "run": str(ours), **base},
            "trl": {"kind": "trl", "run": str(folder / f"trl-{i}"), "reference": str(ours),
                    "packing": args.trl_packing == "true", **base},
        }  # fmt: skip
        for name, config in runs.items():
            result = common.run_child("bench.trl_sft", config)
            if "error" not in result:
                result.update(answer_loss(Path(config["run"]), ours, cache))
                result["load_after"] = common.load()
            results[name].append(result)
            shown = f"{result['real_tokens_per_s']:,.0f} real tokens/s" if "error" not in result else result["error"]
            print(f"[trl_sft] {name}, repeat {i + 1}: {shown} (load {common.load()})", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config = common.child_config(argv)
    if config is not None:
        common.write_child_result(config, child(config))
        return
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default {STEPS}, quick {QUICK_STEPS})")
    p.add_argument("--repeats", type=int, default=1, help="hftextgen/TRL pairs, alternating (default 1)")
    p.add_argument("--trl-packing", choices=("true", "false"), default="true", help="TRL packs its rows (default)")
    args = p.parse_args(argv)
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    before = common.load()
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        results = measure(args, Path(tmp), steps)

    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in results[name] if key in r]
        return statistics.median(values) if values else None

    note = f"{steps} steps of 8 rows of <= 256 tokens; TRL packing {args.trl_packing}"
    rows = [
        common.Row("real tokens/s (TRL = baseline)", median("trl", "real_tokens_per_s"),
                   median("hftextgen", "real_tokens_per_s"), "tokens/s", note=note),
        common.Row("peak RSS", median("trl", "peak_rss_gb"), median("hftextgen", "peak_rss_gb"), "GB", False),
        common.Row("held-out answer loss (nats/token)", median("trl", "loss"), median("hftextgen", "loss"),
                   "nats", False),
    ]  # fmt: skip
    title = "Task fine-tuning on the dialogue recipe's data: TRL SFTTrainer (baseline) vs hftextgen finetune"
    common.report("trl_sft", title, rows, args, before, results=results)


if __name__ == "__main__":
    main()
