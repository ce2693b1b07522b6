"""The train stage: `hftextgen finetune` and `hftextgen validate`, a recipe run on a stock Trainer.

The rest of the house uses only the names below; the modules behind them are the stage's own.
"""

from .. import stage_exports

_EXPORTS = {
    "finetune_recipe": "finetune:finetune",
    "validate_recipe": "validate:validate",
    "describe_estimate": "validate:describe",
    "Schedule": "schedule",
    "schedule_of": "schedule",
    "PreferenceConfig": "preference_config",
    "saved_reference": "reference:saved",
}
__all__ = sorted(_EXPORTS)
__getattr__ = stage_exports(__name__, _EXPORTS)
