"""LoRA (peft.method lora) on a tiny saved GPT-2 and a tiny saved Llama: the run directory holds the
adapter and a merged model that stock transformers loads, the merged model computes what the base
with the adapter does, generate and evaluate take either, a killed run resumes exactly, two
processes train as one, gradient checkpointing and bf16 work, validate counts what LoRA trains,
and checkpoints of another adapter or of a whole model are refused on resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import files_args, finetune_offline, flags, made_once, save_tiny_pretrained, write_corpus
from runs import kill_once_saved, launch_two
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, pipeline

from hftextgen.model import lora
from hftextgen.train import rundir

pytestmark = pytest.mark.slow  # every test here trains end to end

LEARNING_RATE = 5e-3

LINEAR = {
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
}


class LoraRun:
    """A finished LoRA run of 8 steps (checkpoints and evaluations every 4, samples every 4,
    adapter dropout on), its base model, corpus and data cache."""

    def __init__(self, model_type: str, root: Path):
        self.model_type, self.root = model_type, root
        self.base, self.corpus, self.cache, self.run_dir = (root / n for n in ("base", "corpus", "cache", "run"))

    def argv(self, run_dir: Path, *extra: str, dropout: float = 0.1) -> list[str]:
        settings = {
            "peft.method": "lora",
            "peft.dropout": dropout,
            "train.max_steps": 8,
            "train.save_steps": 4,
            "train.eval_steps": 4,
            "train.learning_rate": LEARNING_RATE,
            "evaluate.sample_every": 4,
            "evaluate.stride": 8,
            "generate.prompts": '["HAMLET:", ""]',
        }
        if not dropout:  # the base model's too (GPT-2: 0.1); zero is fine where there is none
            settings |= {"model.resid_pdrop": 0.0, "model.embd_pdrop": 0.0, "model.attn_pdrop": 0.0}
        return files_args(
            self.corpus, run_dir, *flags(settings), *extra, model=["--model.name_or_path", str(self.base)]
        )


# Every test on GPT-2 and on Llama (other target modules, grouped-query attention); the Llama
# set is in the extended suite (`make test-all`), CI trains Llama in test_architecture.
@pytest.fixture(scope="module", params=["gpt2", pytest.param("llama", marks=pytest.mark.extended)])
def lora_run(request, tmp_path_factory) -> LoraRun:
    def make(root: Path) -> None:
        run = LoraRun(request.param, root)
        write_corpus(run.corpus)
        save_tiny_pretrained(run.base, request.param)
        finetune_offline(run.argv(run.run_dir), run.cache)

    return LoraRun(request.param, made_once(tmp_path_factory, f"lora-{request.param}", make))


@pytest.fixture(autouse=True)
def _lora_cache(request, monkeypatch):
    if "lora_run" in request.fixturenames:
        monkeypatch.setenv("HFTEXTGEN_CACHE", str(request.getfixturevalue("lora_run").cache))


def losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # peft reads a renamed transformers property
def test_a_lora_run_writes_its_adapter_and_a_merged_model(lora_run):
    run_dir, adapter = lora_run.run_dir, lora_run.run_dir / lora.ADAPTER_DIR
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    for name in ("model.safetensors", "config.json", "tokenizer.json", "eval.json", "samples.jsonl", "README.md"):
        assert (run_dir / name).is_file(), name
    # transformers would load a folder holding both as the model plus the adapter, twice adapted.
    assert not (run_dir / "adapter_config.json").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lora_run.base) and config["r"] == 8
    assert sorted(config["target_modules"]) == LINEAR[lora_run.model_type]  # every linear layer by default

    # Only the adapters trained: a fraction of a percent of the weights.
    info = json.loads((run_dir / "run_info.json").read_text())
    assert 0 < info["trainable_parameters"] < 0.01 * info["parameters"]

    # Evaluation and samples during training, and the evaluator at the end.
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [4, 8]
    assert [json.loads(line)["step"] for line in (run_dir / "training_samples.jsonl").read_text().splitlines()] == [
        4,
        4,
        8,
        8,
    ]
    card = (run_dir / "README.md").read_text()
    assert "- lora\n" in card and f"- {lora_run.model_type}\n" in card and "with LoRA (rank 8" in card

    # The merged model computes what the base with the adapter does (1e-5), and differs from the
    # base: the adapter learned something.
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(lora_run.base).eval()
    x = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(x).logits
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
        assert (merged(x).logits - adapted(x).logits).abs().max().item() < 1e-5
        assert (merged(x).logits - base_logits).abs().max().item() > 1e-3
    text = pipeline("text-generation", model=str(run_dir))("HAMLET:", max_new_tokens=6, do_sample=False)
    assert text[0]["generated_text"].startswith("HAMLET:")


def test_checkpoints_hold_the_adapter_and_count_as_complete(lora_run, tmp_path):
    checkpoint = lora_run.run_dir / "checkpoint-8"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert "model.safetensors" not in names
    assert rundir.checkpoint_problem(checkpoint) is None
    copy = tmp_path / "checkpoint-8"
    shutil.copytree(checkpoint, copy)
    os.truncate(copy / "adapter_model.safetensors", 100)
    assert rundir.checkpoint_problem(copy) == "adapter_model.safetensors is cut short"
    (copy / "adapter_model.safetensors").unlink()
    assert rundir.checkpoint_problem(copy) == "no model weights"


def test_generate_and_evaluate_take_the_adapter_or_the_merged_model(lora_run, tmp_path, run_cli):
    run_dir = lora_run.run_dir
    scores = {}
    for name, model in (("merged", run_dir), ("adapter", run_dir / lora.ADAPTER_DIR)):
        code, _, err = run_cli("evaluate", "--model", model, "--evaluate.output_dir", tmp_path / name)
        assert code == 0, err
        scores[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert scores["adapter"]["perplexity"] == pytest.approx(scores["merged"]["perplexity"], rel=1e-5)
    # The adapter folder takes its run's held-out documents, as the run directory does.
    assert scores["adapter"]["documents"] == scores["merged"]["documents"] == 2
    assert scores["merged"]["perplexity"] == pytest.approx(
        json.loads((run_dir / "eval.json").read_text())["perplexity"]
    )

    # generate loads each (the adapter folder and a checkpoint on their base, as evaluate did).
    for model in (run_dir, run_dir / lora.ADAPTER_DIR, run_dir / "checkpoint-8"):
        out = tmp_path / f"{model.name}.jsonl"
        code, _, err = run_cli("generate", "--model", model, "--prompt", "HAMLET:", "--output", out)
        assert code == 0, err
        record = json.loads(out.read_text())
        assert record["model"] == str(model) and record["new_tokens"] > 0


def test_a_killed_lora_run_resumes_exactly(lora_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    kill_once_saved(lora_run.argv(run_dir), lora_run.cache, tmp_path, run_dir / "checkpoint-4", step_delay="0.1")
    assert not (run_dir / lora.ADAPTER_DIR).exists()

    code, _, err = run_cli(*lora_run.argv(run_dir, "--train.resume_from_checkpoint", "last"))
    assert code == 0, err
    # Adapter dropout is on: the random state came back too. float32 on one thread: exact.
    expected = losses(lora_run.run_dir)
    assert list(losses(run_dir)) == list(range(1, 9))
    assert max(abs(losses(run_dir)[s] - expected[s]) for s in expected) <= 1e-6
    for name in ("model.safetensors", f"{lora.ADAPTER_DIR}/adapter_model.safetensors"):
        assert largest_difference(load_file(run_dir / name), load_file(lora_run.run_dir / name)) <= 1e-6, name


@pytest.mark.extended  # test_launch trains 2 processes like one; this is the same with an adapter
def test_two_processes_train_a_lora_run_as_one_does(lora_run, tmp_path, run_cli):
    # Dropout off (the adapters' and the base model's): each process draws its own masks.
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(*lora_run.argv(one, "--train.per_device_train_batch_size", "4", dropout=0.0))
    assert code == 0, err
    result = launch_two(
        lora_run.argv(two, "--train.per_device_train_batch_size", "2", dropout=0.0), lora_run.cache, tmp_path
    )
    output = result.stdout + result.stderr
    assert output.count("batch: 4 blocks = 2 per device x 2 processes x 1 accumulation") == 1
    assert output.count("held-out loss") == 1 and "[rank1]" not in output
    # As for full fine-tuning (test_launch.py): float32 summation order only, measured ~1e-6.
    a, b = losses(one), losses(two)
    assert list(a) == list(b) == list(range(1, 9))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    # The weights are held to a bound that follows from AdamW, not from float32: each step moves
    # a weight by up to the learning rate whatever its gradient's size, so a gradient that is ~0
    # in both runs (LoRA's A matrices while B is still ~0) turns summation-order noise into a
    # visible share of a step. Measured: 1.8e-4 on an Intel Xeon (AMX), < 1e-4 on an AMD EPYC,
    # against steps of 5e-3; a tenth of one step bounds it. A real difference between the runs
    # (a batch seen twice, a missed all-reduce) moves weights by whole steps.
    bound = LEARNING_RATE / 10
    for name in ("model.safetensors", f"{lora.ADAPTER_DIR}/adapter_model.safetensors"):
        assert largest_difference(load_file(one / name), load_file(two / name)) < bound, name


@pytest.mark.extended
def test_gradient_checkpointing_and_bf16_with_lora(lora_run, tmp_path, run_cli):
    quick = ("--evaluate.at_end_of_training", "false")  # the run's steps and schedule, without its ending
    code, _, err = run_cli(*lora_run.argv(tmp_path / "ckpt", *quick, "--train.gradient_checkpointing", "true"))
    assert code == 0, err
    # Frozen embeddings: without enable_input_require_grads the checkpointed blocks would pass no
    # gradient to the adapters, and these losses would differ from the run's.
    expected = losses(lora_run.run_dir)
    got = losses(tmp_path / "ckpt")
    assert max(abs(got[s] - expected[s]) for s in got) <= 1e-5

    code, _, err = run_cli(*lora_run.argv(tmp_path / "bf16", *quick, "--train.bf16", "true"))
    assert code == 0, err
    bf16 = losses(tmp_path / "bf16")
    assert all(abs(bf16[s] - expected[s]) < 0.05 for s in bf16), (bf16, expected)  # bf16 rounding only
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights, merged


def test_validate_counts_what_lora_trains(lora_run, tmp_path, run_cli):
    code, out, err = run_cli("validate", *lora_run.argv(tmp_path / "run")[1:], "--json")
    assert code == 0, err
    estimate = json.loads(out[out.index("{") :])
    model, formula = estimate["model"], estimate["memory"]["formula"]
    info = json.loads((lora_run.run_dir / "run_info.json").read_text())
    assert (model["parameters"], model["trainable_parameters"]) == (info["parameters"], info["trainable_parameters"])
    trainable, total = info["trainable_parameters"], info["parameters"]
    assert model["lora"]["trainable_share"] == pytest.approx(trainable / total, rel=1e-4)
    assert formula["weights"] == 4 * total and formula["gradients"] == 4 * trainable
    assert formula["optimizer"] == 8 * trainable and formula["lora_saves"] == 12 * (total - trainable)
    # A checkpoint holds the adapter and its AdamW state (and the tokenizer), not the model's 12
    # bytes a parameter: as the run's own checkpoints.
    real = sum(f.stat().st_size for f in (lora_run.run_dir / "checkpoint-8").iterdir())
    assert estimate["disk"]["checkpoint_bytes"] == pytest.approx(real, rel=0.05) and real < 12 * total
    assert not (tmp_path / "run").exists()


def test_resuming_with_another_adapter_or_a_whole_model_is_refused(lora_run, tmp_path, run_cli):
    run_dir = tmp_path / "run"
    shutil.copytree(lora_run.run_dir, run_dir)
    code, _, err = run_cli(*lora_run.argv(run_dir, "--train.resume_from_checkpoint", "last", "--peft.r", "4"))
    assert code == 2 and err.strip() == (
        f"hftextgen: error: train.resume_from_checkpoint: {run_dir}/checkpoint-8 holds an adapter with peft.r=8, "
        f"but this recipe builds 4: resume with the run's own recipe: hftextgen finetune --config "
        f"{run_dir}/recipe.yaml --train.resume_from_checkpoint last"
    )
    argv = [a for a in lora_run.argv(run_dir, "--train.resume_from_checkpoint", "last") if a != "lora"]
    argv[argv.index("--peft.method") + 1 : argv.index("--peft.method") + 1] = ["null"]
    code, _, err = run_cli(*argv)
    assert code == 2 and "holds a LoRA adapter, but this recipe trains every weight" in err


def test_the_lora_recipe_runs(lora_run, tmp_path, run_cli):
    """recipes/custom/lora.yaml as its first line says to run it, on the tiny base and corpus."""
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        "finetune",
        *["--config", Path(__file__).parents[1] / "recipes/custom/lora.yaml", "--model.name_or_path", lora_run.base],
        *["--data.paths", f"[{lora_run.corpus}/*.txt]", "--data.block_size", "32", "--train.output_dir", run_dir],
        *["--train.max_steps", "2", "--evaluate.at_end_of_training", "false", "--train.bf16", "false"],
    )
    assert code == 0, err
    assert (run_dir / lora.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / lora.ADAPTER_DIR / "adapter_config.json").read_text())["r"] == 16
