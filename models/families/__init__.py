"""Model families: each module registers one ModelFamily (see base.py and registry.py)."""
