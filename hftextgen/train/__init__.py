"""The train stage: `hftextgen finetune` and `hftextgen validate`, a recipe run on a stock Trainer.

The rest of the house uses only the names below; the modules behind them are the stage's own.
"""

from .. import stage_exports

_EXPORTS = {
    "TrainArguments": "config",
    "finetune_recipe": "finetune",
    "validate_recipe": "validate",
    "describe_estimate": "validate",
    "Schedule": "schedule",
    "schedule_of": "schedule",
    "PreferenceConfig": "config",
    "saved_reference": "reference",
}
__all__ = sorted(_EXPORTS)
__getattr__ = stage_exports(__name__, _EXPORTS)
