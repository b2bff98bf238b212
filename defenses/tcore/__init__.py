"""T-Core: Trusted Core Bootstrapping (phases in sifting, confusion, channels, bootstrap; driver in defense)."""

from .defense import TCore

__all__ = ["TCore"]
