"""ember.peft: parameter-efficient fine-tuning as module transforms over a built model.

    lora.py    LoRAConfig, LoRALinear, apply_lora / merge_lora / adapters_disabled / lora_state_dict
"""

from ember.peft.lora import LoRAConfig, LoRALinear, adapters_disabled, apply_lora, has_lora, lora_state_dict, merge_lora

__all__ = ["LoRAConfig", "LoRALinear", "adapters_disabled", "apply_lora", "has_lora", "lora_state_dict", "merge_lora"]
