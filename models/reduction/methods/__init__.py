"""The built-in reduction methods; importing a module registers its method. Models list their
methods in this order."""

import importlib

BUILTIN = ("pumer", "tome", "prune_only", "tcvit", "evit", "lookupvit", "two_stream")

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")
