"""The built-in families; importing a module registers its family."""

from models.families import lookupvit, vilt, vision  # noqa: F401
