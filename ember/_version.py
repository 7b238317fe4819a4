"""The version, in a module that imports nothing (the package, checkpoints and `ember --version` read it)."""

__version__ = "0.1.0"
