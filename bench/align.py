"""DPO and GRPO on CPU: ember vs TRL's DPOTrainer and GRPOTrainer, same tiny HF model, data and settings.

    .venv/bin/python bench/align.py                     # Llama-shaped 4 x 256, vocab 2048 (trained BPE), 64 pairs
    .venv/bin/python bench/align.py --steps 20 --batch 8

One process: a random LlamaForCausalLM and a byte-level BPE tokenizer trained here; the same 64 synthetic
prompt / chosen / rejected texts (plain text, the completion followed by EOS, as both tokenize them).
TRL: `DPOTrainer` with a reference copy, sigmoid loss, AdamW, `--steps` optimizer steps of `--batch`
pairs; its reported train_runtime (dataset preparation excluded) gives steps/s. ember: `ember.train.loss.DPOLoss`
with a frozen reference copy through `Trainer.train_step`, the same number of steps, all timed. Each
contender runs alone in a child process, which also reports its peak RSS (VmHWM); the two run one after
the other, so a busy machine can tilt the ratio (rerun it).
GRPO: 2 prompts x 4 completions of at most 24 tokens per step, a brevity reward, beta 0: TRL's GRPOTrainer
generating with transformers vs ember's RolloutLoader (ember's own generate) + GRPOLoss; steps/s include
the rollouts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import machine_line  # noqa: E402

WORDS = "the a cat dog sat ran on under mat log happy sad yes no maybe blue green red quickly slowly".split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--only", choices=["ember", "trl", "ember-grpo", "trl-grpo"], default=None)
    p.add_argument("--grpo-steps", type=int, default=6)
    p.add_argument("--workdir", default=None)
    return p.parse_args(argv)


def make_assets(workdir: Path, a):
    """Tokenizer, HF model and pairs on disk (shared by the children)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ember.tokenizer import train_bpe

    rng = random.Random(0)
    sent = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    pairs = [{"prompt": sent(rng.randint(8, 16)), "chosen": " " + sent(rng.randint(6, 14)),
              "rejected": " " + sent(rng.randint(6, 14))} for _ in range(64)]
    tok = train_bpe([p["prompt"] + p["chosen"] + p["rejected"] + "\n" for p in pairs] * 4, vocab_size=512)
    tok.save(workdir / "tok")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=a.embd, intermediate_size=int(8 / 3 * a.embd // 64 * 64),
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.eos_id,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    LlamaForCausalLM(cfg).save_pretrained(workdir / "hf")
    (workdir / "pairs.json").write_text(json.dumps(pairs))


def run_trl(workdir: Path, a) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(workdir / "tok"))
    model = AutoModelForCausalLM.from_pretrained(workdir / "hf", attn_implementation="sdpa")
    data = Dataset.from_list(json.loads((workdir / "pairs.json").read_text()))
    args = DPOConfig(output_dir=str(workdir / "trl_out"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                     learning_rate=1e-5, beta=0.1, loss_type="sigmoid", logging_steps=10 ** 6, save_strategy="no",
                     report_to=[], use_cpu=True, dataloader_num_workers=0, max_length=128, seed=0,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    out = trainer.train()
    return a.steps / out.metrics["train_runtime"]


def run_ember(workdir: Path, a) -> float:
    from ember.data.pref import PairLoader, PrefDataConfig, load_pairs
    from ember.io.hf import read_hf_config, read_hf_weights
    from ember.models.hf import config_from_hf, state_dict_from_hf
    from ember.models.transformer import from_state_dict
    from ember.tokenizer import Tokenizer
    from ember.train.loop import TrainConfig, Trainer
    from ember.train.loss import DPOConfig, DPOLoss
    from ember.train.optim import build_optimizer, build_scheduler

    tok = Tokenizer.load(workdir / "tok")
    hf_cfg = read_hf_config(workdir / "hf")
    cfg = config_from_hf(hf_cfg)
    sd = state_dict_from_hf(read_hf_weights(workdir / "hf"), cfg, "llama")
    policy = from_state_dict(cfg, {k: v.clone() for k, v in sd.items()}).train()
    ref = from_state_dict(cfg, {k: v.clone() for k, v in sd.items()}).eval()
    pcfg = PrefDataConfig(max_length=128)
    pairs = load_pairs(workdir / "pairs.json", tok, pcfg)
    loader = PairLoader(pairs, a.batch, pad_id=tok.pad_id or 0)
    tc = TrainConfig(max_steps=10 ** 6, batch_size=a.batch, lr=1e-5, min_lr=1e-6, warmup_steps=0, schedule="constant",
                     weight_decay=0.0, grad_clip=1.0, eval_every=0, log_every=10 ** 9)
    opt = build_optimizer(policy, tc.lr, tc.weight_decay)
    tr = Trainer(policy, opt, build_scheduler(opt, tc), loader, None, tc, loss_fn=DPOLoss(DPOConfig(beta=0.1), ref),
                 frozen={"reference": ref})
    t = time.perf_counter()  # every step timed, the first included, as TRL's train_runtime does
    for _ in range(a.steps):
        tr.train_step()
    return a.steps / (time.perf_counter() - t)


def _brevity(prompts, completions):
    return [max(0.0, 1.0 - len(c) / 64) for c in completions]


def run_trl_grpo(workdir: Path, a) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(str(workdir / "tok"))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(workdir / "hf", attn_implementation="sdpa")
    prompts = [p["prompt"] for p in json.loads((workdir / "pairs.json").read_text())]
    data = Dataset.from_list([{"prompt": p} for p in prompts])

    def reward(completions, **kwargs):
        return _brevity(None, completions)

    args = GRPOConfig(output_dir=str(workdir / "trl_grpo"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=24, max_steps=a.grpo_steps, learning_rate=1e-5, beta=0.0,
                      logging_steps=10 ** 6, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                      dataloader_num_workers=0, temperature=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tok)
    out = trainer.train()
    return a.grpo_steps / out.metrics["train_runtime"]


def run_ember_grpo(workdir: Path, a) -> float:
    from ember.io.hf import read_hf_config, read_hf_weights
    from ember.models.hf import config_from_hf, state_dict_from_hf
    from ember.models.transformer import from_state_dict
    from ember.tokenizer import Tokenizer
    from ember.train.loop import TrainConfig, Trainer
    from ember.train.loss import GRPOConfig, GRPOLoss
    from ember.train.optim import build_optimizer, build_scheduler
    from ember.train.rollouts import RolloutLoader

    tok = Tokenizer.load(workdir / "tok")
    cfg = config_from_hf(read_hf_config(workdir / "hf"))
    policy = from_state_dict(cfg, state_dict_from_hf(read_hf_weights(workdir / "hf"), cfg, "llama")).train()
    prompts = [p["prompt"] for p in json.loads((workdir / "pairs.json").read_text())]
    loader = RolloutLoader(tok, prompts, [(_brevity, 1.0)], group_size=4, prompts_per_step=2, max_new_tokens=24)
    loader.policy = policy
    tc = TrainConfig(max_steps=10 ** 6, batch_size=8, lr=1e-5, min_lr=1e-6, warmup_steps=0, schedule="constant",
                     weight_decay=0.0, grad_clip=1.0, eval_every=0, log_every=10 ** 9)
    opt = build_optimizer(policy, tc.lr, tc.weight_decay)
    tr = Trainer(policy, opt, build_scheduler(opt, tc), loader, None, tc, loss_fn=GRPOLoss(GRPOConfig(group_size=4)))
    t = time.perf_counter()
    for _ in range(a.grpo_steps):
        tr.train_step()
    return a.grpo_steps / (time.perf_counter() - t)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.only:
        wd = Path(a.workdir)
        rate = {"ember": run_ember, "trl": run_trl, "ember-grpo": run_ember_grpo, "trl-grpo": run_trl_grpo}[a.only](wd, a)
        print(json.dumps({"steps_per_s": rate, "peak_rss_mb": peak_rss_mb()}))
        return
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        make_assets(wd, a)
        print(f"model: Llama-shaped {a.layers} x {a.embd}, vocab 512; 64 pairs; batch {a.batch}; {a.steps} steps")
        res = {}
        for who in ("trl", "ember", "trl-grpo", "ember-grpo"):  # each alone in a child: steps/s, its peak RSS
            cmd = [sys.executable, __file__, "--only", who, "--workdir", str(wd), "--steps", str(a.steps),
                   "--batch", str(a.batch), "--layers", str(a.layers), "--embd", str(a.embd),
                   "--grpo-steps", str(a.grpo_steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=1800)
            lines = [x for x in out.stdout.strip().splitlines() if x.startswith("{")]
            if not lines:
                raise SystemExit(f"{who} failed:\n{out.stderr[-3000:]}")
            res[who] = json.loads(lines[-1])
            print(f"  {who:10s} {res[who]['steps_per_s']:.2f} optimizer steps/s, peak RSS {res[who]['peak_rss_mb']:.0f} MiB")
        print(f"ratio ember/TRL DPO steps/s: {res['ember']['steps_per_s'] / res['trl']['steps_per_s']:.2f}x; "
              f"peak RSS {res['ember']['peak_rss_mb'] / res['trl']['peak_rss_mb']:.2f}x")
        print(f"ratio ember/TRL GRPO (rollout of 2 prompts x 4 completions x 24 tokens + update) steps/s: "
              f"{res['ember-grpo']['steps_per_s'] / res['trl-grpo']['steps_per_s']:.2f}x")


if __name__ == "__main__":
    main()
