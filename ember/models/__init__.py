"""ember.models: one decoder Transformer family (plain PyTorch; imports torch only)."""

from ember.models.config import PRESETS, ModelConfig, RopeScaling, pad_vocab, preset
from ember.models.transformer import Transformer, from_state_dict

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "Transformer", "pad_vocab", "preset", "from_state_dict"]
