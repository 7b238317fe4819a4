"""Rollouts for online RL: a Loader whose batches the current policy samples itself (ember's own inference).

Each `next_batch()`:

    prompts  = the next `prompts_per_step` prompts (a seeded order over the prompt file, epoch after epoch)
    samples  = G completions per prompt from the policy, in one batched `ember.infer.generate.generate` call (the engine)
               (temperature sampling; the generator is seeded by (seed, step), so a resumed run samples
               exactly what the uninterrupted one did)
    rewards  = the weighted sum of the reward functions, per completion
    batch    = prompt + completion ids, labels on the completion, group-relative advantages, and the
               per-completion statistics the objective logs (reward, its group std, zero-std groups, length)

Reward functions take (prompts: list[str], completions: list[str]) and return one float per completion.
They are the user's own Python (`--reward my_rewards.py:fn`), loaded by path; a reward model checkpoint
can be one too (`reward_model_fn`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ember.errors import EmberError
from ember.train.loss import IGNORE_INDEX, group_advantages

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """"path/to/file.py:function" -> the function (the user's own code, run by their choice)."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise EmberError(f"--reward {spec!r}: expected FILE.py:FUNCTION")
    if not Path(path).is_file():
        raise EmberError(f"--reward {spec!r}: {path} not found")
    mod_spec = importlib.util.spec_from_file_location(f"ember_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise EmberError(f"--reward {spec!r}: {path} has no function {name!r}")
    return fn


def reward_model_fn(checkpoint: str, device: str = "cpu", batch_size: int = 16) -> RewardFn:
    """A reward model checkpoint (head kind "reward") as a reward function: each prompt a user turn, each
    completion the assistant's reply (as `ember reward train` renders its pairs), truncated to the
    length it was trained on, scored at the last real token, `batch_size` at a time."""
    from ember.data.cls import cls_batch
    from ember.data.sft import chat_example
    from ember.infer.api import load_tokenizer
    from ember.io.checkpoint import load_checkpoint
    from ember.parallel import resolve_device
    from ember.train.loss import RewardLoss

    model, meta = load_checkpoint(checkpoint, device=resolve_device(device), kinds=("reward",))
    model.eval()
    tok = load_tokenizer(checkpoint, meta, None)
    pad = tok.fill_id
    max_len = meta.get("extra", {}).get("max_length", model.cfg.block_size)

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        ids = [chat_example(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": c}])[0][:max_len]
               for p, c in zip(prompts, completions)]
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                b = cls_batch([(x, 0) for x in ids[i:i + batch_size]], pad)
                out += RewardLoss.rewards(model, b["input_ids"], b["last"]).tolist()
        return out
    return score


class RolloutLoader:
    """Batches of G sampled completions per prompt, scored and given group-relative advantages."""

    def __init__(self, tok, prompts: list[str], rewards: list[tuple[RewardFn, float]], group_size: int,
                 prompts_per_step: int, max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
                 std_eps: float = 1e-4, max_prompt_tokens: int = 256, dp_rank: int = 0, dp_size: int = 1):
        if not prompts:
            raise EmberError("RL prompts: none. HINT: a JSONL file of {\"prompt\": ...} records")
        self.tok, self.prompts, self.rewards = tok, prompts, rewards
        self.G, self.per_step, self.max_new = group_size, prompts_per_step, max_new_tokens
        self.temperature, self.seed, self.std_eps = temperature, seed, std_eps
        self.max_prompt_tokens = max_prompt_tokens
        self.dp_rank, self.dp_size = dp_rank, dp_size  # each rank rolls out its own share of the step's prompts
        self.policy: Optional[torch.nn.Module] = None  # set by the recipe once the model is built
        self.samples_path: Optional[Path] = None  # where each rollout is appended as JSONL (None: nowhere)
        self.prepare: Optional[Callable[[torch.nn.Module, dict], dict]] = None  # PPO: values, GAE at rollout time
        self.step, self.epoch, self.pos = 0, 0, 0
        self.last_samples: list[tuple[str, str, float]] = []

    def _next_prompts(self) -> list[str]:
        """This rank's share of the step's prompts: the next per_step x dp_size of a seeded order (the same
        on every rank), slice dp_rank."""
        step_prompts, want = [], self.per_step * self.dp_size
        while len(step_prompts) < want:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))
            take = order[self.pos:self.pos + want - len(step_prompts)].tolist()
            step_prompts += [self.prompts[i] for i in take]
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return step_prompts[self.dp_rank * self.per_step:(self.dp_rank + 1) * self.per_step]

    def next_batch(self) -> dict:
        from ember.infer.generate import generate
        from ember.infer.sample import SamplingParams

        if self.policy is None:
            raise EmberError("RolloutLoader: no policy model set")
        texts = self._next_prompts()
        prompt_ids = [self.tok.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True)
                      [-self.max_prompt_tokens:] for t in texts]
        rows = [p for p in prompt_ids for _ in range(self.G)]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step * 1009 + self.dp_rank)
        ends = sorted({i for i in (self.tok.eos_id, self.tok.token_to_id("<|im_end|>")) if i is not None})
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad():
            completions = generate(self.policy, rows, self.max_new, SamplingParams(temperature=self.temperature),
                                   stop_ids=ends, generator=gen, vocab_limit=self.tok.vocab_size)
        self.policy.train(was_training)
        self.step += 1
        prompts_rep = [t for t in texts for _ in range(self.G)]
        decoded = [self.tok.decode([i for i in c if i not in ends]) for c in completions]
        reward = torch.zeros(len(rows), dtype=torch.float64)
        for fn, w in self.rewards:
            vals = list(fn(prompts_rep, decoded))
            if len(vals) != len(rows):
                raise EmberError(f"reward function {getattr(fn, '__name__', fn)} returned {len(vals)} values for "
                                 f"{len(rows)} completions")
            reward += w * torch.tensor(vals, dtype=torch.float64)
        self.last_samples = list(zip(prompts_rep, decoded, reward.tolist()))
        if self.samples_path is not None:
            import json

            with open(self.samples_path, "a", encoding="utf-8") as f:
                for prompt, completion, r in self.last_samples:
                    f.write(json.dumps({"rollout": self.step, "prompt": prompt, "completion": completion,
                                        "reward": r}, ensure_ascii=False) + "\n")
        batch = self._batch(rows, completions, reward)
        return self.prepare(self.policy, batch) if self.prepare is not None else batch

    def _batch(self, rows: list[list[int]], completions: list[list[int]], reward: torch.Tensor) -> dict:
        full = [p + c for p, c in zip(rows, completions)]
        T = max(len(f) for f in full) - 1
        pad = self.tok.pad_id or 0
        ids = torch.full((len(full), T), pad, dtype=torch.long)
        labels = torch.full((len(full), T), IGNORE_INDEX, dtype=torch.long)
        for b, (p, f) in enumerate(zip(rows, full)):
            n = len(f) - 1
            ids[b, :n] = torch.tensor(f[:-1])
            labels[b, len(p) - 1:n] = torch.tensor(f[len(p):])  # predict every completion token
        std = reward.view(-1, self.G).std(1)
        return {"input_ids": ids, "labels": labels,
                "advantages": group_advantages(reward.float(), self.G, self.std_eps),
                "reward": reward.float(), "reward_std": std.repeat_interleave(self.G).float(),
                "zero_std_groups": (std < 1e-8).float().repeat_interleave(self.G),
                "completion_length": torch.tensor([len(c) for c in completions], dtype=torch.float32)}

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos, "seed": self.seed, "G": self.G,
                "n": len(self.prompts), "dp_size": self.dp_size}

    def load_state_dict(self, sd: dict) -> None:
        for k in ("seed", "G", "n", "dp_size"):
            if sd.get(k) != self.state_dict()[k]:
                raise EmberError(f"rollout state: {k} is {sd.get(k)!r} in the checkpoint but {self.state_dict()[k]!r} "
                                 "now. HINT: resume with the same prompts and group size")
        self.step, self.epoch, self.pos = int(sd["step"]), int(sd["epoch"]), int(sd["pos"])
