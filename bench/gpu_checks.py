"""bench/gpu.py's children that check a path rather than time steps: `hftextgen validate`'s
estimate, and FSDP's final full-model save.

    validate  `hftextgen validate --config RECIPE --json [flags]` in this process; returns its
              estimate (steps, tokens/s, time, memory formula and measured peak, disk).
    fsdp      `accelerate launch --config_file launch/fsdp.yaml --num_processes 1 -m hftextgen
              finetune --config RECIPE` for a few steps, with a sharded checkpoint on the way;
              then, in this process, the final model must load with stock
              AutoModelForCausalLM.from_pretrained (no missing, unexpected or mismatched
              weights), give finite logits, and its tokenizer must load too.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def validate(config: dict) -> dict:
    from hftextgen import cli

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["validate", "--config", config["recipe"], "--json", *config.get("flags", [])]
        argv += ["--train.output_dir", f"{tmp}/run", "--data.cache_dir", config["cache_dir"]]
        printed = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            code = cli.main(argv)
        seconds = time.perf_counter() - started
    text = printed.getvalue()
    if code:
        raise SystemExit(f"hftextgen validate exited with {code}: {text[-2000:]}")
    estimate = json.loads(text[text.rindex("\n{") + 1 :] if not text.startswith("{") else text)
    return {"estimate": estimate, "validate_s": seconds}


def fsdp(config: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        steps = config["steps"]
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(common.ROOT / "launch/fsdp.yaml"),
        ]
        cmd += ["--num_processes", "1", "-m", "hftextgen", "finetune", "--config", config["recipe"]]
        cmd += [*config.get("flags", []), "--train.max_steps", str(steps), "--train.save_steps", str(steps // 2)]
        cmd += ["--train.eval_strategy", "no", "--train.load_best_model_at_end", "false"]
        cmd += ["--evaluate.at_end_of_training", "false", "--train.disable_tqdm", "true"]
        cmd += ["--train.output_dir", str(run), "--data.cache_dir", config["cache_dir"]]
        started = time.perf_counter()
        code = common.run_command(cmd)
        result = {"train_s": time.perf_counter() - started, "command": " ".join(cmd[1:])}
        if code != 0:
            raise SystemExit(f"the FSDP run exited with {code}")
        result["checkpoints"] = sorted(p.name for p in run.glob("checkpoint-*"))
        result["files"] = sorted(p.name for p in run.iterdir())
        result.update(_check_saved_model(run))
    return result


def _check_saved_model(path: Path) -> dict:
    """What stock transformers makes of the final model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("ROMEO: hello there")["input_ids"]])
    with torch.no_grad():
        logits = lm(ids).logits
        spread = float(lm.transformer.h[0].mlp.c_fc.weight.std())  # 0 would mean an empty save
    problems = {k: v for k, v in info.items() if v}
    return {
        "loads": not problems,
        "loading_problems": {k: [str(x) for x in v][:10] for k, v in problems.items()},
        "parameters": lm.num_parameters(),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "weights_std": spread,
    }


def main(argv: list[str]) -> None:
    config = common.child_config(argv)
    if config is None:
        raise SystemExit("bench.gpu_checks is run by bench/gpu.py (--child CONFIG)")
    common.write_child_result(config, {"validate": validate, "fsdp": fsdp}[config["kind"]](config))


if __name__ == "__main__":
    main(sys.argv[1:])
