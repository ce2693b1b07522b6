"""Launching with accelerate: every file in launch/ is a config accelerate accepts and turns into
the intended topology, the Slurm script hands each node its rank, and two CPU processes (gloo,
started from launch/multi_gpu.yaml) train exactly as one process does, resume, and write one
run directory.

GPUs (one, several, FSDP, several machines) cannot run here; those paths differ from the tested
two-process one only in the config, which the first tests check as far as accelerate lets a
machine without GPUs go.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, TINY_TRAIN, flags, made_once, write_corpus
from runs import launch_two
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hftextgen import cache

pytestmark = pytest.mark.slow  # every test here trains end to end

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "launch").glob("*.yaml"))
TOPOLOGY = {
    "cpu.yaml": "NO",
    "single_gpu.yaml": "NO",
    "multi_gpu.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "multi_node.yaml": "MULTI_GPU",
}


def header_command(path: Path) -> list[str]:
    """The command a launch file opens with, as words."""
    first = path.read_text().splitlines()[0 if path.suffix == ".yaml" else 1]
    assert first.startswith("# "), f"{path.name} must open with the command that uses it"
    return shlex.split(first[2:])


def accelerate_flags(command: list[str]) -> list[str]:
    """The flags between `accelerate launch` and `-m hftextgen`."""
    assert command[:2] == ["accelerate", "launch"], command
    return command[2 : command.index("-m")]


def accelerate_args(flags_: list[str]):
    """What `accelerate launch FLAGS -m hftextgen` makes of a config and flags, without starting
    anything. _validate_launch_command is private, but it is accelerate's own reading of the
    file: no public dry run exists."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args([*flags_, "-m", "hftextgen", "finetune"])
    return _validate_launch_command(args)[0]


def torchrun_env(args, monkeypatch) -> dict[str, str]:
    """The environment and torchrun arguments accelerate's multi-GPU launcher would use."""
    import accelerate.utils.launch

    # Another test on this machine may hold the default port; nothing is bound here.
    monkeypatch.setattr(accelerate.utils.launch, "is_port_in_use", lambda port=29500: False)
    return accelerate.utils.launch.prepare_multi_gpu_env(args)


def test_launch_holds_a_config_per_topology():
    assert {p.name for p in CONFIGS} == set(TOPOLOGY)
    assert (ROOT / "launch" / "slurm.sbatch").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_is_one_accelerate_accepts(path):
    from accelerate.commands.config.config_args import ClusterConfig

    command = header_command(path)
    flags_ = accelerate_flags(command)
    assert flags_[:2] == ["--config_file", f"launch/{path.name}"]
    assert command[command.index("-m") :][:4] == ["-m", "hftextgen", "finetune", "--config"]
    assert (ROOT / command[command.index("--config") + 1]).is_file()

    # Unknown top-level keys are an error here; values are converted to accelerate's enums.
    config = ClusterConfig.from_yaml_file(path)
    assert config.distributed_type.value == TOPOLOGY[path.name]
    assert config.compute_environment.value == "LOCAL_MACHINE"
    # Precision belongs to the recipe (train.bf16): a config's would override it unseen.
    assert config.mixed_precision == "no"

    # accelerate lets its own flags' defaults win over some keys (same_network, rdzv_backend):
    # every key a file sets must be one it reads.
    args = accelerate_args(["--config_file", str(path)])
    for key, value in yaml.safe_load(path.read_text()).items():
        if key not in ("compute_environment", "distributed_type", "fsdp_config"):
            assert getattr(args, key) == value, f"{path.name}: accelerate ignores {key}: {value}"

    args = accelerate_args([flags_[0], str(path), *flags_[2:]])
    assert args.use_fsdp == (TOPOLOGY[path.name] == "FSDP")
    assert args.multi_gpu == (TOPOLOGY[path.name] == "MULTI_GPU")
    # accelerate copies fsdp_config keys onto its options unchecked: a typo would vanish.
    for key in config.fsdp_config:
        assert hasattr(args, key), f"{path.name}: fsdp_config.{key} is not an accelerate option"


def test_one_process_configs():
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    cpu = accelerate_args(["--config_file", str(ROOT / "launch/cpu.yaml")])
    _, env = prepare_simple_launcher_cmd_env(cpu)
    assert cpu.num_processes == 1 and env["ACCELERATE_USE_CPU"] == "True"

    gpu = accelerate_args(["--config_file", str(ROOT / "launch/single_gpu.yaml")])
    _, env = prepare_simple_launcher_cmd_env(gpu)
    # One process pinned to one GPU id, so the Trainer cannot fall back to DataParallel over
    # several. Which variable the launcher turns gpu_ids into (CUDA_VISIBLE_DEVICES, ...) is
    # accelerate's business and depends on the machine: it sets none where it finds no GPU.
    assert gpu.num_processes == 1 and gpu.gpu_ids == "0" and not gpu.use_cpu
    assert env["ACCELERATE_USE_CPU"] == "False"


def test_multi_gpu_config(monkeypatch):
    args = accelerate_args(["--config_file", str(ROOT / "launch/multi_gpu.yaml"), "--num_processes", "8"])
    env = torchrun_env(args, monkeypatch)
    assert args.nproc_per_node == "8" and int(args.master_port) > 0  # port 0: a free one
    assert "ACCELERATE_USE_FSDP" not in env and env["ACCELERATE_MIXED_PRECISION"] == "no"


def tiny(model_type: str):
    from transformers import AutoConfig

    settings = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 16, "intermediate_size": 32}
    config = AutoConfig.for_model(model_type, **settings, vocab_size=64, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type, block", [("gpt2", "GPT2Block"), ("llama", "LlamaDecoderLayer")])
def test_fsdp_config_wraps_each_models_own_blocks_and_shards_checkpoints(monkeypatch, model_type, block):
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    args = accelerate_args(["--config_file", str(ROOT / "launch/fsdp.yaml"), "--num_processes", "8"])
    env = torchrun_env(args, monkeypatch)
    assert env["ACCELERATE_USE_FSDP"] == "true" and args.nproc_per_node == "8"
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # no class named: the model's own list decides
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"  # train.py gathers the final save whole
    model = tiny(model_type)
    # FSDP2's wrapping (what accelerate.prepare applies): one unit per block of the model, from
    # its _no_split_modules, and nothing else.
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert {type(m).__name__ for m in model.modules() if policy(m)} == {block}
    assert sum(policy(m) for m in model.modules()) == 2  # one per layer
    plugin.set_auto_wrap_policy(model)  # FSDP1's reading of the same config agrees
    assert {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]} == {block}


def test_multi_node_config_gives_each_machine_its_rank(monkeypatch):
    command = header_command(ROOT / "launch/multi_node.yaml")
    flags_ = accelerate_flags(command)
    flags_[1] = str(ROOT / flags_[1])
    for rank in (0, 1):
        flags_[flags_.index("--machine_rank") + 1] = str(rank)
        args = accelerate_args(flags_)
        torchrun_env(args, monkeypatch)
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", rank, "8")
        assert args.rdzv_endpoint == "10.0.0.1:29500"


FAKE_SLURM = {
    # srun: the command once per node, as Slurm would run it there.
    "srun": """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" || exit; done
""",
    "scontrol": """#!/bin/bash
[[ "$*" == "show hostnames gpu[07-08]" ]] && printf 'gpu07\\ngpu08\\n'
""",
    # accelerate: record the arguments, one per line, per node.
    "accelerate": """#!/bin/bash
printf '%s\\n' "$@" > "$RECORD/node$SLURM_NODEID"
""",
}


@pytest.mark.parametrize("launch", [None, "launch/fsdp.yaml"])
def test_slurm_script_starts_one_launcher_per_node(tmp_path, monkeypatch, launch):
    script = ROOT / "launch/slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RECORD": str(tmp_path),
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
    }
    if launch:
        env["LAUNCH"] = launch
    header = header_command(script)
    assert header[0] == "sbatch" and header[header.index("launch/slurm.sbatch") + 1].startswith("recipes/")
    recipe = "recipes/shakespeare/gpt2-small.yaml"
    subprocess.run(["bash", str(script), recipe, "--train.output_dir", "runs/two words"], check=True, env=env, cwd=ROOT)

    for node in (0, 1):
        argv = (tmp_path / f"node{node}").read_text().splitlines()
        assert argv[:2] == ["launch", "--config_file"]
        flags_ = argv[1 : argv.index("-m")]
        assert argv[argv.index("-m") :] == [
            *["-m", "hftextgen", "finetune", "--config", recipe],
            *["--train.output_dir", "runs/two words"],
        ]
        config = flags_[1]
        assert config == (launch or "launch/multi_node.yaml") and (ROOT / config).is_file()
        flags_[1] = str(ROOT / config)
        args = accelerate_args(flags_)
        torchrun_env(args, monkeypatch)
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", node, "4")
        assert "gpu07" in (getattr(args, "master_addr", None), getattr(args, "rdzv_endpoint", "").split(":")[0])


def test_make_finetune_launch_options():
    def make(*variables):
        return subprocess.run(
            ["make", "-n", "finetune", "VENV=/nonexistent/venv", *variables],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    plain = make()
    assert "/nonexistent/venv/bin/hftextgen finetune --config recipes/shakespeare/tiny.yaml" in plain.stdout
    launched = make("LAUNCH=launch/multi_gpu.yaml", "NPROC=2")
    assert re.search(
        r"accelerate launch --config_file launch/multi_gpu.yaml --num_processes 2 \\\s+"
        r"-m hftextgen finetune --config recipes/shakespeare/tiny.yaml",
        launched.stdout,
    ), launched.stdout
    for variables, message in (
        (["NPROC=2"], "NPROC=2 needs a launch config"),
        (["LAUNCH=launch/cpu.yaml", "NPROC=2"], "launch/cpu.yaml runs one process"),
    ):
        failed = make(*variables)
        assert failed.returncode != 0 and message in failed.stderr


def test_cache_keeps_the_entry_another_machine_finished_first(tmp_path, monkeypatch):
    """Several machines sharing a cache each prepare data once: the later rename must not fail."""
    real_lookup = cache.lookup
    with cache.writing(tmp_path, "entry") as tmp:
        (tmp / "data").write_text("mine")
        # Between this writer's check and its rename, another one puts its entry in place.
        other = tmp_path / "entry"
        other.mkdir()
        (other / "data").write_text("theirs")
        (other / cache.COMPLETE).touch()
        calls = iter([None])
        monkeypatch.setattr(cache, "lookup", lambda root, entry: next(calls, None) or real_lookup(root, entry))
    assert (tmp_path / "entry" / "data").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


# Two CPU processes against one. Dropout off: each process draws its own dropout masks, so with
# dropout the runs would differ by design, not by a bug.
NO_DROPOUT = flags({"model.resid_pdrop": 0.0, "model.embd_pdrop": 0.0, "model.attn_pdrop": 0.0})
STEPS = flags({"train.max_steps": 8, "train.save_steps": 4, "train.eval_steps": 4})


def finetune_args(corpus: Path, run_dir: Path, per_device_batch: int, *extra: str) -> list[str]:
    data = flags({"data.source": "files", "data.paths": f"[{corpus}/*.txt]", "data.validation_fraction": 0.25})
    return [
        "finetune",
        *data,
        *TINY_MODEL,
        *NO_DROPOUT,
        *TINY_TRAIN,
        *STEPS,
        "--train.per_device_train_batch_size",
        str(per_device_batch),
        "--train.output_dir",
        str(run_dir),
        *extra,
    ]


def log(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "trainer_state.json").read_text())["log_history"]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log(run_dir) if "loss" in e}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One run of 8 steps under 2 processes (2 blocks each), shared by the tests below."""

    def make(root: Path) -> None:
        corpus = write_corpus(root / "corpus")
        result = launch_two(finetune_args(corpus, root / "run", 2), root / "cache", root)
        (root / "output.txt").write_text(result.stdout + result.stderr)

    root = made_once(tmp_path_factory, "two", make)
    return root / "corpus", root / "run", root / "cache", (root / "output.txt").read_text()


def test_two_processes_write_one_run_directory_and_say_everything_once(two_process_run):
    _, run_dir, cache_dir, output = two_process_run
    for name in ("model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "data_report.json"):
        assert (run_dir / name).is_file(), name
    for name in ("validation_documents.json", "run_info.json", "eval_results.json", "trainer_state.json"):
        assert (run_dir / name).is_file(), name
    # One random-state file per process in each checkpoint, and no half-written file anywhere.
    rng_states = sorted(p.name for p in (run_dir / "checkpoint-8").glob("rng_state_*"))
    assert rng_states == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not [p for p in run_dir.rglob(".*")]
    assert AutoModelForCausalLM.from_pretrained(run_dir).config.n_layer == 2

    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["processes"], info["per_device_batch_size"], info["effective_batch_size"]) == (2, 2, 4)
    assert info["tokens_per_step"] == 4 * 32

    # Preprocessing ran once (the other process read the cache), and nothing is said twice.
    assert output.count("Tokenizing 8 documents") == 1, output
    entries = list((cache_dir / "data").iterdir())
    assert len(entries) == 1 and (entries[0] / cache.COMPLETE).is_file()
    assert output.count("batch: 4 blocks = 2 per device x 2 processes x 1 accumulation (128 tokens per step)") == 1
    assert output.count("held-out loss") == 1 and output.count("data: prepared") == 1
    assert len(re.findall(r"^step \d+/8 ", output, re.M)) == 8, output
    assert "\r" not in output  # off a terminal, progress comes as plain lines
    assert "[rank1]" not in output and "Warning" not in output, output


def test_two_processes_train_like_one_with_the_same_global_batch(two_process_run, tmp_path, run_cli):
    corpus, two_dir, _, _ = two_process_run
    one_dir = tmp_path / "one"
    code, _, err = run_cli(*finetune_args(corpus, one_dir, 4))
    assert code == 0, err

    # Same blocks in every step: accelerate deals each step's 4 blocks of the seeded shuffle out
    # 2 and 2, and DDP averages the two halves' gradients. What remains is float32 summation
    # order (a mean of 4 against a mean of two means of 2): measured 2e-6 on the losses and
    # 4e-6 on the weights after 8 steps. A real difference is far larger: another data order
    # (train.data_seed) moves these losses by 0.02-0.11 from step 2 on, a 10% higher learning
    # rate by 0.01-0.11. 1e-4 sits 50x above the noise and 100x below those.
    one, two = train_losses(one_dir), train_losses(two_dir)
    assert list(one) == list(two) == list(range(1, 9))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4, (one, two)
    weights_one, weights_two = load_file(one_dir / "model.safetensors"), load_file(two_dir / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    assert max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one) < 1e-4

    # Evaluation under 2 processes is close but not exact: accelerate fills the last evaluation
    # batch of a process with repeated blocks so that both take the same number of steps (57
    # blocks here), and Trainer's loss average counts the filled batch's mean in place of the
    # real block's. 2e-3 bounds that (measured 6e-4).
    eval_one = json.loads((one_dir / "eval_results.json").read_text())["eval_loss"]
    eval_two = json.loads((two_dir / "eval_results.json").read_text())["eval_loss"]
    assert eval_two == pytest.approx(eval_one, abs=2e-3)


@pytest.mark.extended
def test_two_processes_resume_from_the_last_checkpoint(two_process_run, tmp_path):
    corpus, run_dir, cache_dir, _ = two_process_run
    # The same run, as if it had stopped after its checkpoint at step 4.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed, ignore=shutil.ignore_patterns("checkpoint-8"))
    result = launch_two(
        finetune_args(corpus, resumed, 2, "--train.resume_from_checkpoint", "last"), cache_dir, tmp_path
    )
    output = result.stdout + result.stderr
    assert re.findall(r"^step (\d+)/8 ", output, re.M) == ["5", "6", "7", "8"], output
    assert output.count("held-out loss") == 1
    # Data order, optimizer, schedule and every process's random state come back: steps 5-8
    # repeat the uninterrupted run's.
    expected, got = train_losses(run_dir), train_losses(resumed)
    assert list(got) == list(range(1, 9))
    assert [got[s] for s in range(5, 9)] == pytest.approx([expected[s] for s in range(5, 9)], abs=1e-6)
    assert json.loads((resumed / "trainer_state.json").read_text())["global_step"] == 8
    assert (resumed / "checkpoint-8" / "rng_state_1.pth").is_file()
    assert torch.allclose(
        load_file(resumed / "model.safetensors")["transformer.wte.weight"],
        load_file(run_dir / "model.safetensors")["transformer.wte.weight"],
        rtol=0,
        atol=1e-6,
    )
