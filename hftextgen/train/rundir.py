"""The run directory: its checkpoints and their integrity, the resume and overwrite policy, the
final model's atomic save, and the disk it needs.

- Checkpoints: the Trainer writes a checkpoint-N folder in place, file by file, with
  trainer_state.json last and nothing renamed into place. A run killed while saving leaves a
  folder without trainer_state.json or with a file cut short. `checkpoint_problem` finds both,
  and resuming takes the newest checkpoint that has neither.
- Policy: a directory that holds anything is never written into unless the run continues
  (`resolve_resume`) or is started over on request (train.overwrite_output_dir: only a folder
  that looks like a run is ever deleted, and only once the new run is ready).
- Resuming: a checkpoint of another model is refused (`check_same_model`), and settings the
  checkpoint overrides or that change the data order are warned about (`changed_on_resume`).
- The final model: written into a hidden folder of the run directory and renamed into place
  file by file, the weights last (`save_final_model`).
- Disk: a warning before training when the checkpoints will not fit (`disk_warning`).

What the run directory holds is listed in docs/monitoring.md ("What a run produces").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from .. import model
from ..errors import UserError, warn
from ..files import write_atomic, write_json
from ..progress import size

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files hftextgen or the Trainer write into every run directory before or while training; a
# folder holding one of them is a run, which train.overwrite_output_dir may delete.
RUN_MARKERS = ("recipe.yaml", "run_info.json", "trainer_state.json")
STAGING = ".final-model"


# ---------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders of a run directory, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def _file_problem(path: Path) -> str | None:
    """Why one file of a checkpoint is unreadable, judged by its format's own structure: a
    safetensors header states the size of the data after it, and torch.save writes a zip
    archive whose directory is its last bytes. Both catch a file cut short (or left empty by a
    machine that crashed before the file reached the disk) without reading the tensors."""
    if path.is_dir():  # a distributed (FSDP) checkpoint: torch writes .metadata when done
        return None if (path / ".metadata").is_file() else f"{path.name}/ has no .metadata"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt"):
                return None
        except Exception:  # safetensors raises its own error type for every kind of damage
            return f"{path.name} is cut short"
    if path.suffix in (".pt", ".pth", ".bin"):
        return None if zipfile.is_zipfile(path) else f"{path.name} is cut short"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return f"{path.name} is cut short"
    return None


def checkpoint_problem(folder: Path, needs_optimizer: bool = True) -> str | None:
    """Why a checkpoint folder cannot be resumed from, in a few words; None when it is complete.

    needs_optimizer: the optimizer, schedule and random states must be there too (every
    checkpoint but those of train.save_only_model). Without them the Trainer would resume
    silently with a fresh AdamW and another random state.
    """
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json: the run stopped while saving it"
    names = {p.name for p in folder.iterdir()}
    # A LoRA run's checkpoints hold its adapter only: the base weights never change.
    required = {"model weights": ("model.safetensors", "model-", "pytorch_model", "adapter_model")}
    if needs_optimizer:
        required |= {"optimizer state": ("optimizer",), "schedule": ("scheduler.pt",), "random state": ("rng_state",)}
    for what, prefixes in required.items():
        if not any(name.startswith(prefixes) for name in names):
            return f"no {what}"
    for path in sorted(folder.iterdir()):
        problem = _file_problem(path)
        if problem:
            return problem
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing = set(json.loads(index.read_text())["weight_map"].values()) - names
        if missing:
            return f"{sorted(missing)[0]} is missing"
    return None


def newest_complete(output_dir: Path, needs_optimizer: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of a run directory, and the newer ones skipped with why."""
    skipped = []
    for folder in checkpoints(output_dir):
        problem = checkpoint_problem(folder, needs_optimizer)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def check_same_model(checkpoint: Path, lm) -> None:
    """A checkpoint of another architecture, shape or adapter would fail deep inside the Trainer
    with a size mismatch for every tensor; say which setting differs instead."""
    checkpoint = Path(checkpoint)
    adapter = checkpoint / model.ADAPTER_CONFIG
    if adapter.is_file() != model.is_peft(lm):
        holds, builds = (
            ("a LoRA adapter", "trains every weight")
            if adapter.is_file()
            else ("a whole model", "trains LoRA adapters")
        )
        _refuse(checkpoint, f"holds {holds}, but this recipe {builds}")
    if adapter.is_file():
        saved = json.loads(adapter.read_text(encoding="utf-8"))
        built = lm.peft_config["default"]
        for key, recipe_key in (("r", "r"), ("lora_alpha", "alpha"), ("target_modules", "target_modules")):
            old, new = saved.get(key), getattr(built, key)
            if isinstance(old, list | set) or isinstance(new, list | set):
                old, new = sorted(old or []), sorted(new or [])
            if old != new:
                _refuse(checkpoint, f"holds an adapter with peft.{recipe_key}={old}, but this recipe builds {new}")
        return
    try:
        saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        saved_shape = model.shape(saved)
    except (OSError, ValueError, KeyError):
        return  # an FSDP checkpoint keeps no config.json; the Trainer reports what it finds
    built_shape = model.shape(lm.config)
    for key, value in saved_shape.items():
        if value != built_shape[key]:
            _refuse(checkpoint, f"holds a model with {key}={value}, but this recipe builds {key}={built_shape[key]}")


def _refuse(checkpoint: Path, why: str) -> None:
    raise UserError(
        f"train.resume_from_checkpoint: {checkpoint} {why}: resume with the run's own recipe: hftextgen finetune "
        f"--config {checkpoint.parent / 'recipe.yaml'} --train.resume_from_checkpoint last"
    )


# What a checkpoint brings back whatever the recipe says now: the optimizer's and scheduler's
# saved states hold the learning rate, its schedule and AdamW's settings.
RESTORED = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "optim",
    "optim_args",
)
# What decides which blocks each step sees: a resumed run skips the batches already trained by
# counting them, so with any of these changed it goes on with other data than the run had.
DATA_ORDER = ("seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps")


def changed_on_resume(saved_recipe: str, recipe: str) -> list[str]:
    """Warnings for settings that differ from the run's saved recipe and that a resumed run
    cannot honour (they are restored from the checkpoint) or that change its data order."""
    import yaml

    try:
        before, now = yaml.safe_load(saved_recipe) or {}, yaml.safe_load(recipe) or {}
    except yaml.YAMLError:
        return []

    def values(section: str, key: str) -> tuple:
        return (before.get(section) or {}).get(key), (now.get(section) or {}).get(key)

    def differs(section: str, key: str) -> bool:
        old, new = values(section, key)
        return key in (before.get(section) or {}) and old != new

    notes = []
    for key in RESTORED:
        if differs("train", key):
            old, new = values("train", key)
            notes.append(
                f"train.{key} is {new!r} here but {old!r} in the run: a resumed run keeps its checkpoint's "
                f"optimizer and schedule, so the new value is not used (start over to use it)"
            )
    order = [f"train.{k}" for k in DATA_ORDER if differs("train", k)]
    order += [
        f"data.{k}" for k in before.get("data") or {} if k not in ("cache_dir", "num_proc") and differs("data", k)
    ]
    if order:
        notes.append(
            f"{', '.join(order)} {'differs' if len(order) == 1 else 'differ'} from the run's: the resumed run skips "
            f"the steps already trained by count, so from here on it sees other data than the run would have"
        )
    return notes


# ---------------------------------------------------------------- resume and overwrite policy


def resolve_resume(value: str | None, output_dir: Path, needs_optimizer: bool = True, main: bool = True) -> str | None:
    """train.resume_from_checkpoint: unset, `last` (the newest complete checkpoint-N in
    output_dir; newer incomplete ones are skipped, and said so), or a checkpoint folder."""
    if value is None or value.lower() in ("", "false", "no"):
        return None
    if value.lower() in ("last", "latest", "true"):
        last, skipped = newest_complete(output_dir, needs_optimizer)
        if main:
            for folder, problem in skipped:
                warn(f"{folder} is incomplete or damaged ({problem}): skipped")
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
    step = checkpoint_step(path)
    if step is None and not (path / "trainer_state.json").is_file():
        raise UserError(
            f"train.resume_from_checkpoint: {value} is not a Trainer checkpoint (no trainer_state.json): "
            f"give a checkpoint-N folder, or `last`"
        )
    if not path.is_dir():
        raise UserError(f"train.resume_from_checkpoint: no such folder: {value}: give a checkpoint-N folder, or `last`")
    problem = checkpoint_problem(path, needs_optimizer)
    if problem:
        earlier = [c for c in checkpoints(path.parent) if step is None or checkpoint_step(c) < step]
        good = next((c for c in earlier if checkpoint_problem(c, needs_optimizer) is None), None)
        instead = f"resume from {good} instead" if good else "no earlier checkpoint is complete: start the run over"
        raise UserError(f"train.resume_from_checkpoint: {value} is incomplete or damaged ({problem}): {instead}")
    return value


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool = False, main: bool = True) -> None:
    """A run directory that holds anything is never written into, unless the run continues
    (resume) or is started over on request (overwrite: only a folder that looks like a run);
    and it must be one the main process can write, found out now rather than after the data
    work. Only the main process probes: under several processes the others would race it,
    one removing the folder another is writing into."""
    if main:
        check_writable(output_dir)
    if resuming or not output_dir.exists():
        return
    present = sorted(p.name for p in output_dir.iterdir())
    if present and overwrite and not looks_like_run(output_dir):
        raise UserError(
            f"train.overwrite_output_dir: {output_dir} does not look like a run directory (no "
            f"{', '.join(RUN_MARKERS)} or checkpoint-N inside), and only runs are deleted: choose another "
            f"--train.output_dir"
        )
    if present and not overwrite:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise UserError(
            f"train.output_dir: {output_dir} is not empty ({shown}): continue that run with "
            f"--train.resume_from_checkpoint last, start it over with --train.overwrite_output_dir true, or "
            f"choose another --train.output_dir"
        )


def check_writable(output_dir: Path) -> None:
    """Create output_dir and a file in it, then remove whatever this made: permissions alone do
    not tell (root passes every check, and /proc or a read-only mount still refuse)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"train.output_dir: {output_dir} is a file: choose a directory")
    made, parent = [], output_dir
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"train.output_dir: cannot write to {output_dir} ({reason}): choose a directory you can write to"
        ) from None
    finally:
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):  # gone, or filled by someone else meanwhile
                folder.rmdir()


def start(output_dir: Path, overwrite: bool, resume: str | None, recipe_yaml: str | None, files: dict) -> None:
    """Make the run directory ready once the data and model are (main process only): clear an
    earlier run on request, warn about settings a resumed run cannot honour, and write the
    resolved recipe and the `files` ({name: JSON payload}) that describe the run."""
    if overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
        # Only now, with the data and model ready: a mistake in the recipe deletes nothing.
        clear_run(output_dir)
        print(f"train.overwrite_output_dir: deleted the earlier run in {output_dir}", flush=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    saved = output_dir / "recipe.yaml"
    if resume is not None and recipe_yaml is not None and saved.is_file():
        for note in changed_on_resume(saved.read_text(encoding="utf-8"), recipe_yaml):
            warn(note)
    if recipe_yaml is not None:
        header = (
            f"# hftextgen finetune --config {saved} --train.output_dir NEW_DIR\n"
            f"# The resolved recipe of this run: every key, defaults included.\n"
        )
        write_atomic(saved, header + recipe_yaml)
    for name, payload in files.items():
        write_json(output_dir / name, payload)


def looks_like_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_MARKERS) or bool(checkpoints(output_dir))


def clear_run(output_dir: Path) -> None:
    """Delete what an earlier run left in output_dir (train.overwrite_output_dir), keeping the
    folder itself (it may be a mount point, or carry permissions someone set)."""
    for path in output_dir.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def save_final_model(trainer, output_dir: Path) -> None:
    """Trainer.save_model writes the model in place, file by file, so a crash would leave half a
    model.safetensors in the run directory. Write it into a hidden folder of the run directory
    (same filesystem) instead, then rename each file into place, the weights last: a reader (or
    a crash) sees each file whole, and the weights appear only once everything else is there."""
    staging = output_dir / STAGING
    main = trainer.args.should_save
    if main and staging.exists():
        shutil.rmtree(staging)  # left by a run killed while saving; its files are in checkpoints
    write_final(trainer, staging)
    if main:
        adapter = staging / model.ADAPTER_DIR
        if adapter.is_dir():  # a folder: renamed whole, so it is never seen half-written
            if (output_dir / model.ADAPTER_DIR).exists():
                shutil.rmtree(output_dir / model.ADAPTER_DIR)  # a resumed run saving its end again
            os.replace(adapter, output_dir / model.ADAPTER_DIR)

        def weights_last(path: Path) -> tuple[bool, bool, str]:
            weights = path.suffix == ".safetensors" or path.name.startswith("pytorch_model")
            return weights, path.name.endswith(".index.json"), path.name

        for path in sorted(staging.iterdir(), key=weights_last):
            os.replace(path, output_dir / path.name)
        staging.rmdir()
    if trainer.args.push_to_hub:  # what Trainer.save_model() does when not called internally
        trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)


def write_final(trainer, folder: Path) -> None:
    """The final model's files in `folder`, as the Trainer saves them (model, tokenizer, training
    arguments). A LoRA run saves its adapter into folder/adapter, then folds it into the base
    weights (in place: merge_adapter) and saves that merged model like any other."""
    if model.is_peft(trainer.accelerator.unwrap_model(trainer.model)):
        trainer.save_model(str(folder / model.ADAPTER_DIR), _internal_call=True)
        model.merge_adapter(trainer)
    trainer.save_model(str(folder), _internal_call=True)  # every process: FSDP gathers here


# ---------------------------------------------------------------- disk space


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def disk_warning(
    output_dir: Path, parameters: int, saves: int, save_total_limit: int | None, trainable: int | None = None
) -> str | None:
    """A warning when the disk under output_dir cannot hold what this run will write, else None.

    A checkpoint holds the fp32 trained weights (4 bytes a parameter: all of them, or a LoRA run's
    `trainable` adapters) and their AdamW moments (8 bytes); the Trainer deletes the oldest one
    only after writing a new one, so save_total_limit + 1 of them exist at once. The final model
    is the weights again. What the run directory already holds (a resumed run's checkpoints)
    counts as spent.
    """
    saves = max(saves, 1)  # a graceful stop saves one even with train.save_strategy no
    checkpoint = (parameters if trainable is None else trainable) * 12
    at_once = min(saves, save_total_limit + 1) if save_total_limit and save_total_limit > 0 else saves
    needed = at_once * checkpoint + parameters * 4
    needed -= sum(_size(p) for p in checkpoints(output_dir)) + _size(output_dir / "model.safetensors")
    where = output_dir
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed <= free:
        return None
    limit = f"train.save_total_limit={save_total_limit}" if save_total_limit else "no train.save_total_limit"
    return (
        f"train.output_dir {output_dir}: {size(free)} free, but this run may write about {size(needed)} more "
        f"({at_once} checkpoints of {size(checkpoint)} (weights + AdamW state) at once with {limit}, and the "
        f"final model): free some space, lower train.save_total_limit, or choose another train.output_dir"
    )
