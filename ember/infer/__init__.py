"""ember.infer: text generation.

The ladder, bottom up (each rung a small function over token ids):

    sample.py     SamplingParams; sample(logits, params, seen, generator): greedy / temperature,
                  top-k, top-p, min-p, repetition penalty (HF order and semantics)
    generate.py   prefill -> decode_one -> generate_iter / generate: static KV cache, left-padded
                  batches of different lengths, per-sample stops, streaming, optional torch.compile
    decode.py     CPU decode kernels: weight layouts, split GEMV, the batch-1 block step; reach the
                  (plain) model by class swaps for the length of a generation
    text.py       TextStream: incremental detokenization with stop strings
    api.py        text in, text out: `ember.generate(checkpoint_or_model, prompt, ...)`; used by the
                  `ember generate` and `ember chat` recipes
"""

from ember.infer.sample import SamplingParams

__all__ = ["SamplingParams"]
