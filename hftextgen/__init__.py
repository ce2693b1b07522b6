"""hftextgen: train, fine-tune and evaluate GPT-2-style text generators from recipes."""

import importlib

__version__ = "0.1.0"


def stage_exports(package: str, exports: dict[str, str]):
    """A stage package's `__getattr__`: each exported name imported from its module on first use.

    Lazy, so that importing a stage (or `hftextgen --help`) loads only what is used, and config.py
    can use a stage's pure functions without loading the stage's models and trainers.
    `exports` maps a public name to "module" or "module:attribute" (a name the module spells differently).
    """

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = exports[name].partition(":")
        value = getattr(importlib.import_module(f"{package}.{module}"), attribute or name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
