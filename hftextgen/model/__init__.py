"""The model stage: the tokenizer, the model a recipe builds or loads, its architecture's shape names, LoRA.

The rest of the house uses only the names below; the modules behind them are the stage's own.
"""

from .. import stage_exports

_EXPORTS = {
    "ModelConfig": "config",
    "PeftConfig": "config",
    "TokenizerConfig": "config",
    "build_model": "build",
    "context_length": "build",
    "check_source": "build",
    "load": "build",
    "pretrained_overrides": "build",
    "set_generation": "build",
    "PROMPT_CONTEXT": "build",
    "DEFAULT_CONTEXT": "architecture",
    "build_config": "architecture",
    "describe_shape": "architecture",
    "shape": "architecture",
    "bundled_gpt2": "tokenizer",
    "build_tokenizer": "tokenizer",
    "encoder_spec": "tokenizer",
    "fingerprint": "tokenizer",
    "ready_for_lm": "tokenizer",
    "ADAPTER_CONFIG": "lora",
    "ADAPTER_DIR": "lora",
    "check_lora_recipe": "lora",
    "is_peft": "lora",
    "lora_parameters": "lora",
    "merge_adapter": "lora",
    "wrap_lora": "lora",
}
__all__ = sorted(_EXPORTS)
__getattr__ = stage_exports(__name__, _EXPORTS)
