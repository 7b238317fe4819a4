"""Multiple-choice evaluation: ember's in-process scorer vs lm-eval's HFLM, same model, same items.

    .venv/bin/python bench/eval.py --checkpoint runs/smollm2 --mmlu data/eval/mmlu.jsonl --items 100

Both score the same (context, continuation) requests of the first N MMLU items (lm-eval's prompt,
choices " A".." D") in one process: ember through `ember.eval.harness.EmberLM` (the engine,
batch-invariant, contexts shared across choices through the prefix cache), lm-eval through `HFLM`
on a transformers model holding the checkpoint's weights (batch size 8; its logits cache computes a
context once for single-token choices). Rounds alternate ember / HFLM so a noisy machine hits both
alike. Prints items/s for each, the ratio, both accuracies and the largest log-likelihood difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import hf_from_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/smollm2")
    ap.add_argument("--mmlu", default="data/eval/mmlu.jsonl")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ember.eval.harness import EmberLM
    from ember.eval.tasks import Settings, parse_tasks

    mmlu = args.mmlu if Path(args.mmlu).exists() else "data/eval/samples-all-large.jsonl"
    docs = parse_tasks(f"mmlu:{mmlu}", Settings(limit=args.items))[0].docs()
    reqs, golds = [], []
    for d in docs:
        for c in d.data["choices"]:
            reqs.append((d.data["context"], c))
        golds.append(d.data["gold"])
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(reqs)]

    ours = EmberLM(checkpoint=args.checkpoint, batch_size=args.batch_size)
    hf, _ = hf_from_checkpoint(args.checkpoint)
    hft = transformers.AutoTokenizer.from_pretrained(str(Path(args.checkpoint) / "tokenizer"))
    ref = HFLM(pretrained=hf, tokenizer=hft, batch_size=args.batch_size, max_length=ours.scorer.max_length)

    def acc(lls):
        right = 0
        for i, g in enumerate(golds):
            row = [lls[4 * i + j][0] for j in range(4)]
            right += int(max(range(4), key=row.__getitem__) == g)
        return right / len(golds)

    times = {"ember": [], "hflm": []}
    out = {}
    for r in range(args.rounds):
        for name, lm in (("ember", ours), ("hflm", ref)):
            if name == "ember":  # a fresh engine each round: nothing cached from the last one
                ours = EmberLM(model=ours.scorer.model, tokenizer=ours.tokenizer, batch_size=args.batch_size)
                lm = ours
            t0 = time.perf_counter()
            with torch.inference_mode():
                out[name] = lm.loglikelihood(inst)
            times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    diff = max(abs(a[0] - b[0]) for a, b in zip(out["ember"], out["hflm"]))
    n = len(docs)
    print(f"\nMMLU, {n} items ({len(reqs)} requests), batch size {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'':8} {'items/s':>9} {'acc':>8}")
    print(f"{'ember':8} {n / best['ember']:9.2f} {acc(out['ember']):8.4f}")
    print(f"{'HFLM':8} {n / best['hflm']:9.2f} {acc(out['hflm']):8.4f}")
    print(f"ratio ember/HFLM: {best['hflm'] / best['ember']:.2f}x; max |loglik difference| {diff:.2e}; "
          f"greedy flags equal: {all(a[1] == b[1] for a, b in zip(out['ember'], out['hflm']))}")


if __name__ == "__main__":
    main()
