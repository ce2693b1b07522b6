"""LoRA (PEFT): low-rank adapters on a frozen pretrained model. The recipe's checks before any
work, wrapping the model, the adapter and merged model a run writes, and loading an adapter
folder on its base model.

A LoRA run writes its adapter into <run>/adapter/ (adapter_config.json, adapter_model.safetensors
and the tokenizer) and the merged model (the adapter folded into the base weights) at the top of
the run directory, like every run, so stock `pipeline("text-generation", model=run_dir)` loads it.
The two live apart because transformers loads a folder that holds both config.json and
adapter_config.json as that model *plus* the adapter: it would apply the adapter twice.
Checkpoints hold the adapter only (the Trainer's own format), and resume from it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from .config import ModelConfig, PeftConfig

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"


def require() -> None:
    if importlib.util.find_spec("peft") is None:
        raise UserError("peft.method=lora needs the peft package, which is not installed: pip install peft")


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def is_peft(model) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def linear_layers(model) -> list[str]:
    """Names (their last part) of the linear layers LoRA can adapt: every one but the output layer
    (the embedding matrix itself in tied models; an adapter as wide as the vocabulary rarely pays)."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    found = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not output
    }
    return sorted(found)


def check_lora_recipe(cfg: PeftConfig, model_cfg: ModelConfig) -> None:
    """Before any work: peft is installed, and every target module and module to save is in the
    pretrained model (built from its config on the meta device: no weights are read)."""
    require()
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..hub import load_from_hub

    name = model_cfg.name_or_path
    config = load_from_hub(AutoConfig.from_pretrained, name, "model", "model.name_or_path", revision=model_cfg.revision)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    check_modules(cfg, skeleton)


def check_modules(cfg: PeftConfig, model) -> None:
    """peft.target_modules and peft.modules_to_save name modules of `model` (peft's matching: the
    whole name, or its end after a dot)."""
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    linear = ", ".join(linear_layers(model))
    kind = model.config.model_type

    def matching(key: str) -> list[torch.nn.Module]:
        return [m for name, m in modules.items() if name == key or name.endswith("." + key)]

    for target in cfg.target_modules or []:
        found = matching(target)
        if not found:
            raise UserError(
                f"peft.target_modules: {target!r} is not a module of this {kind} model: its linear layers are {linear}"
            )
        if not any(isinstance(m, torch.nn.Linear | torch.nn.Embedding | Conv1D) for m in found):
            raise UserError(
                f"peft.target_modules: {target!r} is a {type(found[0]).__name__} in this {kind} model, not a layer "
                f"LoRA can adapt: name linear layers ({linear})"
            )
    for name in cfg.modules_to_save:
        if not matching(name):
            top = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in modules if n and not n[-1].isdigit()})[:12])
            raise UserError(
                f"peft.modules_to_save: {name!r} is not a module of this {kind} model (its modules: {top}, ...)"
            )


def wrap_lora(lm, cfg: PeftConfig, base: str):
    """The model with adapters on its target layers and every other weight frozen; the adapter
    remembers `base` (a local folder as an absolute path, so it loads from any directory)."""
    require()
    from peft import LoraConfig, get_peft_model

    check_modules(cfg, lm)
    targets = cfg.target_modules or linear_layers(lm)
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=cfg.modules_to_save or None,
        fan_in_fan_out=_transposed(lm, targets),
        task_type="CAUSAL_LM",
    )
    with _peft_warnings_off():
        model = get_peft_model(lm, config)
    model.peft_config["default"].base_model_name_or_path = os.path.abspath(base) if os.path.isdir(base) else base
    return model


def _transposed(lm, targets: list[str]) -> bool:
    """GPT-2's layers are Conv1D, which store their weight as (in, out): the adapter must know."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, m in lm.named_modules())


def lora_parameters(lm) -> tuple[int, int]:
    """(trainable, total) parameters; shared (tied) tensors counted once."""
    params = list(lm.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_adapter(trainer):
    """Fold the adapter into the base weights in place (no second copy of the model) and make the
    merged model the Trainer's: its outputs are the adapted model's, and it is what gets saved."""
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    trainer.model = merged
    return merged


def base_of(folder: str | Path, key: str) -> str:
    """The base model an adapter folder was trained on, or a one-line error when it is gone."""
    try:
        base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError):
        base = None
    if not base:
        raise UserError(f"{key}: {folder}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path): add it")
    if (os.path.isabs(base) or base.startswith(".")) and not os.path.isdir(base):
        raise UserError(
            f"{key}: the adapter in {folder} is for the base model {base}, which is not there: put it back, or "
            f"set base_model_name_or_path in {folder}/{ADAPTER_CONFIG} to where it is now"
        )
    return base


def load_merged(lm, folder: str | Path):
    """The base model `lm` with the adapter in `folder` folded in: a plain model again, as fast as
    the base."""
    require()
    from peft import PeftModel

    with _peft_warnings_off():
        return PeftModel.from_pretrained(lm, str(folder)).merge_and_unload()


@contextlib.contextmanager
def _peft_warnings_off():
    """peft reads transformers' is_gradient_checkpointing, which warns that it was renamed: not
    the user's doing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
