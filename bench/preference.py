"""Preference tuning, hftextgen against TRL's DPOTrainer on the same pairs and model: training
tokens/s, peak memory, and held-out preference accuracy after the same steps.

    python -m bench.preference [--quick] [--model runs/shakespeare-dialogue] [--steps 150] [--repeats 2] [--out FILE]

Model: the dialogue recipe's run (recipes/shakespeare/dialogue.yaml makes it), the starting model
and DPO's reference. Pairs: recipes/shakespeare/preference.yaml's (a speech, the speech that
answers it, the same speaker's words from another scene), prepared once by hftextgen; both
trainers get the same training pairs in the same order and the same token ids: TRL's
DPOTrainer is given hftextgen's prompt_ids / chosen_ids / rejected_ids (its own tokenization
skipped, so that neither trains on different tokens), and its stock collator, loss and Trainer.
The same optimizer settings (the recipe's learning rate and schedule, AdamW with hftextgen's
defaults), batch (pairs a step), steps, precision, seed, and dropout off on both (TRL's default).

Three configurations, each in a child process of its own on one thread, interleaved, each repeated:
  hftextgen       the recipe: chosen and rejected packed into rows, reference log-probabilities
                  computed before training (cached; not timed), one model in memory
  trl             DPOTrainer as TRL ships it: each batch padded to its longest sequence, a second
                  copy of the model as the reference, run on every batch
  trl-precompute  DPOTrainer with precompute_ref_log_probs=True (one model; not timed)

Tokens/s: the real tokens of the pairs trained (each pair's prompt twice and both answers, no
padding) over the Trainer's train_runtime. Peak memory: the child's peak resident set (ru_maxrss).
Accuracy: the held-out pairs scored after training by the same function (hftextgen's
evaluate.score_pairs): chosen more likely than rejected, and TRL's rewards/accuracies (chosen's
reward above rejected's, against the reference's log-probabilities of the starting model).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

RECIPE = common.ROOT / "recipes" / "shakespeare" / "preference.yaml"
VARIANTS = ("hftextgen", "trl", "trl-precompute")
THREADS = 1


def _recipe() -> dict:
    import yaml

    return yaml.safe_load(RECIPE.read_text())


def prepare(folder: Path, model: Path, steps: int, batch: int) -> dict:
    """The recipe's pairs with the model's tokenizer: the training subset, in the recipe's order,
    and the held-out pairs with the reference's log-probabilities, written as JSON lines."""
    from hftextgen import cli, evaluate
    from hftextgen import model as model_stage
    from hftextgen.data import PairCollator, open_corpus
    from hftextgen.data import prepare as prepare_data

    recipe = _recipe()
    argv = ["--config", str(RECIPE), "--model.name_or_path", str(model), "--progress", "quiet"]
    _, sections = cli.parse(cli.prepare_parser(), argv)
    cfg = sections.data
    corpus = open_corpus(cfg)
    tok = model_stage.build_tokenizer(sections.tokenizer, sections.model, corpus)
    packed = prepare_data(corpus, tok, model_stage.fingerprint(tok))
    packed.limit_train(steps * batch, cfg.split_seed)
    lm, _ = model_stage.load(str(model), device="cpu")
    reference = evaluate.score_pairs(lm, packed.eval_items, PairCollator(tok.pad_token_id, cfg.block_size), 16)
    rows = {"train": packed.train, "eval": packed.eval_items}
    for name, pairs in rows.items():
        with open(folder / f"{name}.jsonl", "w") as f:
            for i in range(len(pairs)):
                p = pairs[i]
                record = {
                    k: getattr(p, k).tolist()
                    for k in ("prompt", "chosen", "rejected", "chosen_trained", "rejected_trained")
                }
                if name == "eval":
                    record["reference"] = reference[i, :2].tolist()
                f.write(json.dumps(record) + "\n")
    train = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    tokens = sum(2 * len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) for r in train)
    return {
        "pairs": len(train),
        "tokens": tokens,
        "eval_pairs": len(packed.eval_items),
        "lr": recipe["train"]["learning_rate"],
    }


def _items(path: Path):
    import numpy as np

    from hftextgen.data.pairs import PairItem

    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        r = json.loads(line)
        arrays = {k: np.asarray(r[k], bool if k.endswith("trained") else np.int64) for k in r if k != "reference"}
        out.append(PairItem(i, **arrays, reference=np.asarray(r.get("reference", [0.0, 0.0]))))
    return out


def held_out(lm, tok, folder: Path, block: int, beta: float) -> dict:
    """Preference accuracy and reward accuracy of a trained model on the held-out pairs."""
    import numpy as np

    from hftextgen import evaluate
    from hftextgen.data import PairCollator

    items = _items(folder / "eval.jsonl")
    lm.eval()
    scores = evaluate.score_pairs(lm, items, PairCollator(tok.pad_token_id, block), 16)
    ref = np.stack([i.reference for i in items])
    margin = beta * ((scores[:, 0] - ref[:, 0]) - (scores[:, 1] - ref[:, 1]))
    return {"accuracy": float(np.mean(scores[:, 0] > scores[:, 1])), "reward_accuracy": float(np.mean(margin > 0))}


def _common_args(settings: dict) -> dict:
    """TrainingArguments both trainers get: hftextgen's defaults for the recipe."""
    return {
        "max_steps": settings["steps"],
        "per_device_train_batch_size": settings["batch"],
        "learning_rate": settings["lr"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "weight_decay": 0.1,
        "adam_beta2": 0.95,
        "bf16": settings["bf16"],
        "logging_steps": 10,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "seed": 42,
        "disable_tqdm": True,
    }


def worker_hftextgen(folder: Path, settings: dict) -> dict:
    from hftextgen import cli
    from hftextgen import model as model_stage

    run = folder / "run-hftextgen"
    args = _common_args(settings)
    argv = [
        "finetune",
        "--config",
        str(RECIPE),
        "--model.name_or_path",
        settings["model"],
        "--train.output_dir",
        str(run),
    ]
    argv += ["--train.overwrite_output_dir", "true", "--evaluate.at_end_of_training", "false", "--progress", "quiet"]
    argv += ["--preference.max_train_pairs", str(settings["steps"] * settings["batch"])]
    for key in ("max_steps", "per_device_train_batch_size", "learning_rate", "bf16", "logging_steps", "seed"):
        argv += [f"--train.{key}", str(args[key]).lower() if isinstance(args[key], bool) else str(args[key])]
    argv += ["--train.save_strategy", "no", "--train.eval_strategy", "no", "--train.report_to", "none"]
    assert cli.main(argv) == 0
    runtime = json.loads((run / "train_results.json").read_text())["train_runtime"]
    lm, tok = model_stage.load(str(run), device="cpu")
    return {"train_runtime": runtime, **held_out(lm, tok, folder, settings["block"], settings["beta"])}


def worker_trl(folder: Path, settings: dict, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kwargs: dataset  # our token ids, as they are
    tok = AutoTokenizer.from_pretrained(settings["model"])
    lm = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    data = Dataset.from_list(
        [{"prompt_ids": r["prompt"], "chosen_ids": r["chosen"], "rejected_ids": r["rejected"]} for r in rows]
    )
    config = DPOConfig(
        output_dir=str(folder / "run-trl"), beta=settings["beta"], max_length=None, precompute_ref_log_probs=precompute,
        gradient_checkpointing=False, use_cpu=True, **_common_args(settings),
    )  # fmt: skip
    trainer = DPOTrainer(model=lm, args=config, train_dataset=data, processing_class=tok)
    runtime = trainer.train().metrics["train_runtime"]
    return {"train_runtime": runtime, **held_out(trainer.model, tok, folder, settings["block"], settings["beta"])}


def worker(variant: str, folder: Path) -> None:
    settings = json.loads((folder / "settings.json").read_text())
    if variant == "hftextgen":
        result = worker_hftextgen(folder, settings)
    else:
        result = worker_trl(folder, settings, precompute=variant == "trl-precompute")
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_child(variant: str, folder: Path) -> dict:
    # One thread each: on a CPU other jobs share, OpenMP's spinning threads made two-thread timings
    # of the same run swing from 16 s to 362 s (measured); one thread a run is steady and fair to both.
    env = {**os.environ, "PYTHONPATH": str(common.ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env |= {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bench.preference", "--worker", variant, "--folder", str(folder)],
        env=env, cwd=common.ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line[len("RESULT ") :]), "wall": time.perf_counter() - started, "load": os.getloadavg()}


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=common.ROOT / "runs" / "shakespeare-dialogue")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", choices=VARIANTS, default=None, help=argparse_hidden())
    p.add_argument("--folder", type=Path, default=None, help=argparse_hidden())
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.folder)
    if not (a.model / "config.json").is_file():
        raise SystemExit(
            f"{a.model} holds no model: make it with hftextgen finetune --config recipes/shakespeare/dialogue.yaml"
        )
    recipe = _recipe()
    steps = 5 if a.quick else a.steps or recipe["train"]["max_steps"]
    batch, repeats = recipe["train"]["per_device_train_batch_size"], 1 if a.quick else a.repeats
    from hftextgen.config import TrainArguments  # bf16 where the CPU runs it natively, as hftextgen decides

    bf16 = bool(TrainArguments(output_dir=tempfile.gettempdir()).bf16)
    before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-preference-") as tmp:
        folder = Path(tmp)
        data = prepare(folder, a.model, steps, batch)
        settings = {"model": str(a.model), "steps": steps, "batch": batch, "lr": data["lr"], "bf16": bf16,
                    "block": recipe["data"]["block_size"], "beta": recipe["preference"]["beta"]}  # fmt: skip
        (folder / "settings.json").write_text(json.dumps(settings))
        runs = {v: [] for v in VARIANTS}
        for _ in range(repeats):
            for variant in VARIANTS:
                runs[variant].append(run_child(variant, folder))
                print(variant, runs[variant][-1], flush=True)
    report(runs, data, settings, before, a)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def report(runs: dict, data: dict, settings: dict, before, args) -> None:
    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    tps = {v: data["tokens"] / median(v, "train_runtime") for v in VARIANTS}
    rows = []
    for baseline in ("trl", "trl-precompute"):
        memory = median(baseline, "peak_rss") / 1e6, median("hftextgen", "peak_rss") / 1e6
        rows += [
            common.Row(f"real tokens/s (vs {baseline})", tps[baseline], tps["hftextgen"], "tokens/s"),
            common.Row(f"peak memory (vs {baseline})", *memory, "MB", higher_is_better=False),
        ]
    for key in ("accuracy", "reward_accuracy"):
        rows.append(common.Row(f"held-out {key} (vs trl)", median("trl", key), median("hftextgen", key), "share"))
    title = f"preference: {settings['steps']} steps of {settings['batch']} pairs, {data['tokens']:,} real tokens"
    common.report("preference", title, rows, args, list(before), data=data, settings=settings, runs=runs)


if __name__ == "__main__":
    main()
