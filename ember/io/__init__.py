"""ember.io: the on-disk formats, in one place; train, infer and recipes all import them from here.

    checkpoint.py   the plain checkpoint directory: model.safetensors + ember.json (format, version, model
                    config, head kind, tokenizer) + tokenizer/; atomic saves, one-line errors
    hf.py           Hugging Face model directories (config.json, safetensors / sharded / weights-only .bin)
    gguf.py         llama.cpp GGUF files (Llama architecture): weights, tokenizer, chat template
    safe.py         loading that never runs code: `torch.load(weights_only=True)` with one-line errors,
                    a restricted unpickler for torch DCP metadata, a DCP reader/planner built on them
"""
