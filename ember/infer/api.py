"""The Python API for text generation: `ember.generate(checkpoint_or_model, prompt, ...) -> list[str]`.

    import ember
    ember.generate("runs/small/final", "Once upon a time", max_new_tokens=50, temperature=0.8, seed=0)

Text in, text out: prompts are encoded with the checkpoint's tokenizer, generated in batches by
infer/generate.py (token ids only, over the engine), and decoded incrementally by infer/text.py, which also cuts each
sample at the first stop string. The CLI recipes `ember generate` and `ember chat` use these functions.

Context window policy (block_size = the model's maximum sequence length):
* a prompt that leaves no room for one new token is an error, unless `truncate=True`, which keeps
  its last (block_size - max_new_tokens) tokens (at least 1);
* if prompt + max_new_tokens still exceeds block_size, max_new_tokens is clamped, with a warning.
* an empty prompt starts from the tokenizer's EOS id (the document separator), i.e. unconditional text.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ember.errors import EmberError
from ember.infer.generate import generate as generate_ids
from ember.infer.sample import SamplingParams
from ember.infer.text import TextStream
from ember.log import warn

StreamFn = Callable[[int, str], None]  # (sequence index, new text)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise EmberError(f"dtype '{dtype}' is not supported, expected one of {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


# ------------------------------------------------------------------------------------- loading
def load_tokenizer(checkpoint: Union[str, Path], meta: dict, tokenizer: Union[str, Path, None] = None) -> Any:
    """The tokenizer given explicitly, else the checkpoint's copy (<dir>/tokenizer or meta['tokenizer'])."""
    from ember.tokenizer import Tokenizer

    if tokenizer is not None:
        return Tokenizer.load(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    ref = meta.get("tokenizer") or "tokenizer"
    path = Path(ref) if Path(ref).is_absolute() else Path(checkpoint) / ref
    if not path.exists():
        raise EmberError(f"{checkpoint}: the checkpoint has no tokenizer ({path} not found). "
                         "HINT: pass the tokenizer directory with --tokenizer DIR.")
    return Tokenizer.load(path)


def check_vocab(tokenizer: Any, model: torch.nn.Module) -> None:
    """The tokenizer's ids must all be rows of the model's embedding."""
    tv, mv = tokenizer.vocab_size, model.cfg.vocab_size
    if tv > mv:
        raise EmberError(f"tokenizer vocab_size {tv} > model vocab_size {mv}: this tokenizer does not belong "
                         "to this model. HINT: pass the tokenizer the model was trained with (--tokenizer DIR).")


def load(checkpoint: Union[str, Path], device: str = "cpu", dtype: Union[str, torch.dtype, None] = None,
         tokenizer: Union[str, Path, Any, None] = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) from a checkpoint directory; errors are `CheckpointError`/`EmberError`."""
    from ember.io.checkpoint import load_checkpoint
    from ember.parallel import resolve_device

    model, meta = load_checkpoint(checkpoint, device=resolve_device(device), dtype=parse_dtype(dtype),
                                   quantized=True)
    tok = load_tokenizer(checkpoint, meta, tokenizer)
    check_vocab(tok, model)
    return model.eval(), tok


# ------------------------------------------------------------------------------------- prompts
def fit_prompt(ids: list[int], block_size: int, max_new_tokens: int, truncate: bool, where: str = "prompt") -> list[int]:
    """Apply the context window policy (module docstring) to one encoded prompt."""
    if len(ids) < block_size:
        return ids
    if not truncate:
        raise EmberError(f"{where}: {len(ids)} tokens do not fit the model's context window of {block_size} "
                         f"tokens (with room for new ones). HINT: shorten it, or pass --truncate to keep its "
                         f"last {max(1, block_size - max_new_tokens)} tokens.")
    return ids[-max(1, block_size - max_new_tokens):]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], block_size: int, max_new_tokens: int,
                   truncate: bool = False) -> list[list[int]]:
    out = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise EmberError(f"prompt {i}: expected a string, got {type(text).__name__}.")
        ids = tokenizer.encode(text) if text else [eos_id(tokenizer)]
        if ids == [None]:
            raise EmberError(f"prompt {i}: empty, and the tokenizer has no EOS token to start from. "
                             "HINT: give a non-empty prompt.")
        n = len(ids)
        if truncate and n + max_new_tokens > block_size:
            ids = ids[-max(1, block_size - max_new_tokens):]
        ids = fit_prompt(ids, block_size, max_new_tokens, truncate, where=f"prompt {i}")
        if len(ids) < n:
            warn(f"prompt {i}: --truncate cut its first {n - len(ids)} of {n} tokens (kept the last {len(ids)}, "
                 f"leaving room for {max_new_tokens} new ones in the context of {block_size})")
        out.append(ids)
    return out


def clamp_new_tokens(prompt_len: int, max_new_tokens: int, block_size: int) -> int:
    room = block_size - prompt_len
    if max_new_tokens > room:
        warn(f"max_new_tokens {max_new_tokens} + prompt {prompt_len} tokens exceeds the context window "
             f"({block_size}); generating at most {room} tokens.")
        return room
    return max_new_tokens


# ---------------------------------------------------------------------------------- generation
def generate_texts(model: torch.nn.Module, tokenizer: Any, prompt_ids: Sequence[list[int]], max_new_tokens: int,
                   params: SamplingParams, stop: Sequence[str] = (), stop_ids: Sequence[int] = (),
                   generator: Optional[torch.Generator] = None, stream: Optional[StreamFn] = None,
                   batch_size: int = 8, counter: Optional[dict] = None,
                   speculative: Optional[str] = None) -> list[str]:
    """Generate from encoded prompts in batches of `batch_size`; one string per prompt.

    `counter["tokens"]`, when a dict is given, is increased by the number of tokens generated.
    """
    ids_stop = sorted({eos_id(tokenizer), *stop_ids} - {None})
    results: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start: start + batch_size]
        streams = [TextStream(tokenizer, stop, skip_ids=ids_stop) for _ in chunk]

        def on_token(b: int, tok: int, streams=streams, start=start) -> bool:
            if counter is not None:
                counter["tokens"] = counter.get("tokens", 0) + 1
            delta = streams[b].push(tok)
            if delta and stream is not None:
                stream(start + b, delta)
            return streams[b].stopped

        n_new = clamp_new_tokens(max(map(len, chunk)), max_new_tokens, model.cfg.block_size)
        generate_ids(model, chunk, n_new, params, stop_ids=ids_stop, stop_fn=on_token, generator=generator,
                     vocab_limit=tokenizer.vocab_size, speculative=speculative)
        for b, s in enumerate(streams):
            rest = s.flush()
            if rest and stream is not None:
                stream(start + b, rest)
            results.append(s.text)
    return results


def eos_id(tokenizer: Any) -> Optional[int]:
    """The tokenizer's end-of-text id, or None when it has none."""
    try:
        return tokenizer.eos_id
    except EmberError:
        return None


def _stdout_stream(index: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate(checkpoint_or_model: Union[str, Path, torch.nn.Module], prompt: Union[str, list[str]],
             max_new_tokens: int = 128, temperature: float = 0.8, top_k: Optional[int] = 50, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, stop: Optional[Sequence[str]] = None,
             seed: Optional[int] = None, num_samples: int = 1, stream: Union[bool, StreamFn] = False,
             tokenizer: Any = None, batch_size: int = 8, truncate: bool = False, device: str = "cpu",
             dtype: Union[str, torch.dtype, None] = None) -> list[str]:
    """Generated continuations (prompt excluded), `num_samples` per prompt, prompt-major order.

    checkpoint_or_model: a checkpoint directory, or a Transformer (then pass `tokenizer`).
    temperature 0 = greedy. stop: strings that end a sample (cut before them; the EOS id always stops).
    stream: True writes the text of a single sample to stdout as it is produced; a callable
    `stream(index, text)` receives every sample's new text.
    """
    if isinstance(checkpoint_or_model, torch.nn.Module):
        if tokenizer is None:
            raise EmberError("ember.generate: a model was given without a tokenizer. HINT: pass tokenizer=...")
        model, tok = checkpoint_or_model.eval(), load_tokenizer(".", {}, tokenizer)
        check_vocab(tok, model)
    else:
        model, tok = load(checkpoint_or_model, device=device, dtype=dtype, tokenizer=tokenizer)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if num_samples < 1 or max_new_tokens < 0 or batch_size < 1:
        raise EmberError(f"ember.generate: num_samples ({num_samples}) and batch_size ({batch_size}) must be >= 1 "
                         f"and max_new_tokens ({max_new_tokens}) >= 0.")
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty).validate()
    ids = encode_prompts(tok, prompts, model.cfg.block_size, max_new_tokens, truncate)
    ids = [p for p in ids for _ in range(num_samples)]
    if stream is True:
        if len(ids) != 1:
            raise EmberError(f"ember.generate: stream=True prints one sample, got {len(ids)}. "
                             "HINT: pass a callable stream(index, text) instead.")
        stream = _stdout_stream
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return generate_texts(model, tok, ids, max_new_tokens, params, stop or (), (), generator,
                          stream or None, batch_size)
