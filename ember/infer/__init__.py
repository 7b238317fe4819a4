"""ember.infer: text generation.

The ladder, bottom up (each rung a small function over token ids):

    sample.py     SamplingParams; sample(logits, params, seen, generator): greedy / temperature,
                  top-k, top-p, min-p, repetition penalty (HF order and semantics)
    engine.py     the engine: paged KV cache, continuous batching, prefix caching, per-request
                  sampling, speculative decoding, batch invariance (ember serve runs it)
    generate.py   generate_iter / generate: offline generation over the engine (per-prompt stops,
                  streaming, optional prompt-lookup speculation)
    decode.py     CPU decode kernels: weight layouts, split GEMV, the batch-1 block step
    text.py       TextStream: incremental detokenization with stop strings
    api.py        text in, text out: `ember.generate(checkpoint_or_model, prompt, ...)`; used by the
                  `ember generate` and `ember chat` recipes
"""

from ember.infer.sample import SamplingParams

__all__ = ["SamplingParams"]
