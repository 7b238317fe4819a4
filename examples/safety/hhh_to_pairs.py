"""BIG-bench HHH alignment (helpful / honest / harmless / other) -> preference pairs for `ember dpo`.

    .venv/bin/pip download -q --no-deps --no-binary :all: -d .cache/dl bigbench==1.0.0
    tar xzf .cache/dl/bigbench-1.0.0.tar.gz -C .cache/dl --wildcards '*/hhh_alignment/*/task.json'
    .venv/bin/python examples/safety/hhh_to_pairs.py .cache/dl/bigbench-1.0.0 data/safety

Each example has one human-written good answer (score 1) and one bad (score 0); each becomes a chat pair
{"prompt": [user], "chosen": [assistant good], "rejected": [assistant bad]}. A seeded 20% of every subset
is held out (data/safety/test.jsonl) for the refusal / over-refusal evaluation; the rest is train.jsonl.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def pairs(task: Path) -> list[dict]:
    out = []
    for ex in json.loads(task.read_text())["examples"]:
        good = [k for k, v in ex["target_scores"].items() if v == 1]
        bad = [k for k, v in ex["target_scores"].items() if v == 0]
        if good and bad:
            out.append({"prompt": [{"role": "user", "content": ex["input"].strip()}],
                        "chosen": [{"role": "assistant", "content": good[0].strip()}],
                        "rejected": [{"role": "assistant", "content": bad[0].strip()}],
                        "subset": task.parent.name})
    return out


def main(src: str, out: str) -> None:
    tasks = sorted(Path(src).glob("**/hhh_alignment/*/task.json"))
    if not tasks:
        raise SystemExit(f"{src}: no hhh_alignment/*/task.json below it (see the docstring for the commands)")
    rng = random.Random(0)
    train, test = [], []
    for task in tasks:
        items = pairs(task)
        rng.shuffle(items)
        k = round(0.2 * len(items))
        test += items[:k]
        train += items[k:]
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (Path(out) / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} train / {len(test)} test pairs from {len(tasks)} subsets -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
