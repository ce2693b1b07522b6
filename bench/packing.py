"""Task data packed isolated vs padded: tokens/s of real (non-pad) tokens and held-out answer
bits/byte after the same examples.

    python -m bench.packing [--quick] [--examples N] [--rows N] [--shape recipe|small] [--out FILE]

Data: short examples made of the bundled plays (each speech answering the one before it, as
recipes/shakespeare/dialogue.yaml makes them, as prompt/completion records; the first N of the
training plays, and the held-out plays' examples), written to a JSON-lines file in a temporary
folder. Model: the dialogue recipe's (a 1.25M Llama-style block, a 4,096-token BPE trained on
the examples), from scratch, bf16 where the CPU has it, as hftextgen sets it.

Both runs see the same examples once (one epoch) at the same effective batch in examples:
isolated takes 8 rows of up to 256 tokens a step; padded takes as many examples a step as 8
isolated rows hold on average (from the data report), padded to the longest of their batch.
Each run is `hftextgen finetune` in a child process of its own, one after the other. Real
tokens/s: the training split's tokens (pad excluded) / the Trainer's train_runtime. Answer
bits/byte: the end-of-training evaluator on the held-out plays' answers (the same examples for
both: packing does not change what is prepared).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench import common

ROWS = 8
BLOCK = 256


def write_examples(folder: Path, limit: int) -> tuple[Path, Path]:
    """Train and validation files of prompt/completion records from the plays, split by play as
    the dialogue recipe splits them."""
    from hftextgen.data import Corpus, DataConfig, sources

    segments, _, _ = Corpus(DataConfig(source="shakespeare", format="prompt_completion")).segments(False)
    cfg = Corpus(DataConfig(source="shakespeare", format="prompt_completion")).resolved
    train, validation = [], []
    for seg, record in sources.read_all(segments, cfg):
        (validation if seg.split == "validation" else train).append(record.text)
    paths = folder / "train.jsonl", folder / "validation.jsonl"
    paths[0].write_text("\n".join(train[:limit]) + "\n")
    paths[1].write_text("\n".join(validation) + "\n")
    return paths


# --shape small, for a GPU: the dialogue recipe's Llama at GPT-2 small's depth and width (the
# recipe's 1.25M parameters leave a GPU waiting on the host), at a learning rate for that size.
SMALL = ["--model.n_layer", "12", "--model.n_embd", "768", "--model.n_head", "12", "--model.n_kv_head", "4"]
SMALL += ["--model.n_inner", "2048", "--train.learning_rate", "6e-4"]


def finetune(folder: Path, name: str, paths: tuple[Path, Path], packing: str, batch: int, epochs: float,
             shape: list[str]) -> dict:  # fmt: skip
    run = folder / name
    cmd = [
        sys.executable, "-m", "hftextgen", "finetune", "--config", "recipes/shakespeare/dialogue.yaml",
        "--data.source", "files", "--data.paths", f"[{paths[0]}]", "--data.validation_paths", f"[{paths[1]}]",
        "--data.format", "prompt_completion", "--data.packing", packing, "--data.block_size", str(BLOCK),
        "--data.cache_dir", str(folder / "cache"), "--train.output_dir", str(run),
        "--train.max_steps", "-1", "--train.num_train_epochs", str(epochs),
        "--train.per_device_train_batch_size", str(batch), "--train.eval_strategy", "no",
        "--train.save_strategy", "no", "--evaluate.max_answers", "0", "--progress", "quiet", *shape,
    ]  # fmt: skip
    code = common.run_command(cmd)
    if code != 0:
        raise SystemExit(f"{name}: hftextgen finetune exited with {code}")
    report = json.loads((run / "data_report.json").read_text())
    trained = json.loads((run / "train_results.json").read_text())
    scores = json.loads((run / "eval.json").read_text())
    return {
        "report": report,
        "runtime": trained["train_runtime"],
        "real_tokens_per_s": report["train"]["tokens"] * epochs / trained["train_runtime"],
        "bits_per_byte": scores["bits_per_byte"],
        "steps": trained.get("global_step"),
    }


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=4000, help="training examples (default 4,000)")
    p.add_argument("--rows", type=int, default=ROWS, help=f"isolated rows a step (default {ROWS})")
    p.add_argument("--shape", choices=("recipe", "small"), default="recipe", help="the model (default: the recipe's)")
    args = p.parse_args()
    load_before = common.load()
    examples = 300 if args.quick else args.examples
    shape = SMALL if args.shape == "small" else []
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        folder = Path(tmp)
        paths = write_examples(folder, examples)
        isolated = finetune(folder, "isolated", paths, "isolated", args.rows, 1, shape)
        per_row = isolated["report"]["train"]["examples"]["examples"] / isolated["report"]["train"]["rows"]
        padded_batch = max(1, round(args.rows * per_row))
        padded = finetune(folder, "padded", paths, "padded", padded_batch, 1, shape)
    note = f"{args.rows} rows of <= {BLOCK} tokens vs {padded_batch} padded examples a step, model: {args.shape}"
    speed = padded["real_tokens_per_s"], isolated["real_tokens_per_s"]
    learned = padded["bits_per_byte"], isolated["bits_per_byte"]
    rows = [
        common.Row("real tokens/s (padded = baseline)", *speed, "tokens/s", note=note),
        common.Row("held-out answer bits/byte", *learned, "bits/byte", higher_is_better=False),
    ]
    common.report(
        "packing",
        f"Task data, {examples:,} examples, one epoch: padded (baseline) vs isolated",
        rows,
        args,
        load_before,
        examples_per_row=per_row,
        isolated=isolated,
        padded=padded,
    )


if __name__ == "__main__":
    main()
