"""hftextgen: train, fine-tune and evaluate GPT-2-style text generators from recipes."""

import importlib

__version__ = "0.1.0"


def stage_exports(package: str, exports: dict[str, str]):
    """A stage package's `__getattr__`: each exported name imported from its module on first use.

    Lazy, so that importing a stage (or `hftextgen --help`) loads only what is used: a recipe
    section's config module without the stage's models and trainers. `exports` maps a public
    name to the module that defines it under that name.
    """

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__
