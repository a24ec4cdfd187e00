"""The built-in families; importing a module registers its family."""

from models.families import lookupvit, two_stream, vilt, vision  # noqa: F401
