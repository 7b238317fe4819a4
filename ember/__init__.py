"""ember: a PyTorch-native system for large language models."""

from ember._version import __version__

__all__ = ["__version__", "generate"]


def generate(*args, **kwargs):
    """Generate text from a checkpoint; see `ember.infer.api.generate`."""
    from ember.infer.api import generate as _generate

    return _generate(*args, **kwargs)
