"""ember: a PyTorch-native system for large language models."""

__version__ = "0.1.0"


def generate(*args, **kwargs):
    """Generate text from a checkpoint; see `ember.infer.api.generate`."""
    from ember.infer.api import generate as _generate

    return _generate(*args, **kwargs)
