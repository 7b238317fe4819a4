"""Weight-only int8 / int4 quantization of a built model (a transform, like peft/): codes, modules, kernels.

    spec = quantize_model(model, "int4", group_size=32)   # in place; spec goes into ember.json
    prepare_quantized(fresh_meta_model, spec)             # then load_state_dict(assign=True)

See core.py for the schemes and the storage, kernels.py for the CPU kernels.
"""

from ember.quant.core import (METHODS, GROUP_SIZES, QuantEmbedding, QuantLinear, QuantSpec, dequantize_int4,
                              dequantize_int8, pack_int4, prepare_quantized, quantize_int4, quantize_int8,
                              quantize_model, quantized_bytes, set_rowwise, unpack_int4)

__all__ = ["METHODS", "GROUP_SIZES", "QuantEmbedding", "QuantLinear", "QuantSpec", "dequantize_int4",
           "dequantize_int8", "pack_int4", "prepare_quantized", "quantize_int4", "quantize_int8", "quantize_model",
           "quantized_bytes", "set_rowwise", "unpack_int4"]
