"""ember as an lm-evaluation-harness model: `--model ember --model_args checkpoint=DIR`.

    ember lm-eval --model ember --model_args checkpoint=runs/smollm2 --tasks TASK --include_path DIR
    python -c "import ember.eval.harness, lm_eval; lm_eval.simple_evaluate(model='ember', model_args='checkpoint=runs/smollm2', tasks=[...])"

The stock `lm_eval` command only knows the models that ship with it (it has no plugin discovery), so
`ember lm-eval ARGS` runs that same command line with this model registered first. The checkpoint is
scored in this process, without converting it to Hugging Face format, by the same `Scorer` as
`ember evaluate` (eval/scorer.py): log-likelihoods, rolling log-likelihoods and generations from the
batch-invariant engine, so lm-eval's scores do not move with --batch_size, and the choices of a
question share their context's forward pass through the prefix cache.

Log-probabilities are normalised over the tokenizer's vocabulary (padded embedding rows excluded, as
`ember serve` does); lm-eval's HFLM normalises over the padded rows too, so the two agree exactly
when the embedding is not padded and to about the padded rows' probability mass otherwise.
"""

from __future__ import annotations

from typing import Any, Optional

import lm_eval.models
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ember.errors import EmberError


# lm-eval registers its own models when its registry is first read while still empty; registering
# "ember" first would hide them (local-completions, hf, ...), so they are registered before.
BUILTIN_MODELS = tuple(lm_eval.models.MODEL_MAPPING)


@register_model("ember")
class EmberLM(LM):
    def __init__(self, checkpoint: Optional[str] = None, model: Any = None, tokenizer: Any = None,
                 batch_size: Any = 8, max_batch_size: Any = None, device: Optional[str] = "cpu",
                 dtype: Optional[str] = None, max_gen_toks: int = 256, kv_memory_mb: float = 256.0, **kwargs: Any):
        super().__init__()
        from ember.eval.scorer import Scorer
        from ember.infer import api
        from ember.peft.lora import merge_lora
        from ember.tokenizer.chat import end_of_turn_ids

        import torch

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's command line defaults to cuda:0
                from ember.log import warn

                warn(f"lm-eval --model ember: device {device!r} is not available here; running on cpu")
            device = "cpu"
        if model is None:
            if not checkpoint:
                raise EmberError("lm-eval --model ember: pass --model_args checkpoint=DIR")
            model, tokenizer = api.load(checkpoint, device=device or "cpu", dtype=dtype, tokenizer=tokenizer)
            merge_lora(model)
        elif tokenizer is None:
            raise EmberError("EmberLM(model=...) needs tokenizer=...")
        bs = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.tokenizer = tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(model, tokenizer, batch_size=bs, kv_memory_mb=float(kv_memory_mb),
                             eos_ids=end_of_turn_ids(tokenizer))
        self._checkpoint = checkpoint

    # ------------------------------------------------------------------ the three request kinds
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        return [(ll.logprob, ll.is_greedy) for ll in self.scorer.loglikelihood(pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [ll.logprob for ll in self.scorer.rolling([r.args[0] for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_toks = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temp = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            groups.setdefault((tuple(until), max_toks, temp), []).append(i)
        for (until, max_toks, temp), idx in groups.items():
            prompts = [self.scorer.encode(requests[i].args[0]) for i in idx]
            texts = self.scorer.generate(prompts, max_toks, until=until, temperature=temp)
            for i, t in zip(idx, texts):
                out[i] = t[0]
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ chat templates
    @property
    def tokenizer_name(self) -> str:
        return str(self._checkpoint or "ember")

    def chat_template(self, chat_template: Any = False) -> str:
        return str(self.tokenizer.meta.get("chat_template") or "chatml")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


def main(argv: list[str]) -> int:
    """`ember lm-eval ARGS`: lm-eval's own command line with `--model ember` available."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + list(argv)
    cli_evaluate()
    return 0
