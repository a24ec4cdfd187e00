"""The built-in tasks; importing a module registers its task. The API lists them in this order."""

import importlib

BUILTIN = ("vqa", "retrieval", "classify")

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")
