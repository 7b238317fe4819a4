"""Classification: pooled logits == transformers' *ForSequenceClassification with the same weights (the
last real token, never padding); `ember classify train / eval / predict` end to end on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ember.cli import main as cli
from ember.data.cls import cls_batch
from ember.models import Transformer, preset
from ember.train.loss import pooled_logits


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_pooled_logits_equal_transformers_sequence_classification(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    from ember.io.checkpoint import save_checkpoint
    from ember.recipes.convert import to_hf

    body = Transformer(preset("tiny-llama" if case == "llama" else "tiny"))
    body.init_weights(0)
    save_checkpoint(body, tmp_path / "base")
    to_hf(tmp_path / "base", tmp_path / "hf")
    model = Transformer(body.cfg)
    model.load_state_dict(body.state_dict())
    model.set_head(3, generator=torch.Generator().manual_seed(1))
    model.eval()
    pad = 7
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", num_labels=3, pad_token_id=pad, attn_implementation="eager").eval()
    with torch.no_grad():
        hf.score.weight.copy_(model.output.weight)
    g = torch.Generator().manual_seed(2)
    examples = [([int(t) for t in torch.randint(10, 500, (n,), generator=g)], 0) for n in (9, 4, 6)]
    batch = cls_batch(examples, pad_id=pad)
    with torch.no_grad():
        ours = pooled_logits(model, batch)
        theirs = hf(input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        other_pad = cls_batch(examples, pad_id=3)  # what sits in the padding never matters
        torch.testing.assert_close(pooled_logits(model, other_pad), ours, rtol=0, atol=0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from ember.io.checkpoint import save_checkpoint
    from ember.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("cls")
    rng = random.Random(0)
    words = ["meeting", "lunch", "tomorrow", "call", "home", "later", "okay", "thanks"]
    spam = ["WIN", "PRIZE", "FREE", "CLAIM", "CASH", "URGENT"]
    rows = []
    for i in range(120):
        is_spam = i % 3 == 0
        pool = spam + words[:3] if is_spam else words
        rows.append({"text": " ".join(rng.choice(pool) for _ in range(rng.randint(3, 9))),
                     "label": "spam" if is_spam else "ham"})
    with open(root / "msgs.csv", "w", newline="") as f:
        import csv

        w = csv.DictWriter(f, fieldnames=["label", "text"])
        w.writeheader()
        w.writerows(rows)
    train_bpe([r["text"] + "\n" for r in rows] * 3, vocab_size=300).save(root / "tok")
    model = Transformer(preset("tiny-llama", vocab_size=320, n_layer=3))
    model.init_weights(0)
    save_checkpoint(model, root / "base", tokenizer_dir=root / "tok")
    return root


def test_classify_train_eval_predict(base, tmp_path, capsys):
    from ember.io.checkpoint import load_checkpoint

    run = tmp_path / "run"
    assert cli(["classify", "train", "--checkpoint", str(base / "base"), "--data.path", str(base / "msgs.csv"),
                "--data.balance", "--run-dir", str(run), "--train.max-steps", "40", "--train.batch-size", "8",
                "--train.lr", "3e-3", "--train.warmup-steps", "2", "--train.eval-every", "20", "--train.log-every", "5",
                "--train.save-every", "0", "--train.layers", "last-1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "classes ['ham', 'spam']" in out and "final classifier" in out
    model, meta = load_checkpoint(run / "final", kinds=("classifier",))
    assert meta["head"] == {"kind": "classifier", "num_classes": 2, "labels": ["ham", "spam"]}
    assert model.output.weight.shape == (2, model.cfg.n_embd)
    body, _ = load_checkpoint(base / "base")
    for name, p in body.named_parameters():  # last-1: only the last block, the final norm and the head moved
        if name.startswith(("layers.0.", "layers.1.", "tok_embeddings")):
            assert torch.equal(p, model.state_dict()[name]), name
    assert not torch.equal(body.layers["2"].attention.wq.weight, model.layers["2"].attention.wq.weight)

    assert cli(["classify", "eval", "--checkpoint", str(run / "final"), "--split", "test"]) == 0
    rep = json.loads((run / "final" / "eval-test" / "report.json").read_text())
    assert rep["accuracy"] > 0.8 and set(rep["per_class"]) == {"ham", "spam"}
    assert sum(map(sum, rep["confusion"])) == rep["examples"] > 0
    assert (run / "final" / "eval-test" / "confusion.png").stat().st_size > 1000
    capsys.readouterr()
    assert cli(["classify", "predict", "--checkpoint", str(run / "final"), "--text", "FREE PRIZE CLAIM CASH WIN",
                "--text", "lunch tomorrow okay thanks", "--json"]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["label"] for p in preds] == ["spam", "ham"] and all(0.5 < p["probability"] <= 1 for p in preds)

    # a classifier is not a language model: generate says what to use instead
    assert cli(["generate", "--checkpoint", str(run / "final"), "--prompt", "hi"]) == 1
    assert "holds a classifier head" in capsys.readouterr().err


def test_classify_bad_inputs(base, tmp_path, capsys):
    args = ["classify", "train", "--checkpoint", str(base / "base"), "--run-dir", str(tmp_path / "r")]
    assert cli(args + ["--data.path", str(base / "msgs.csv"), "--data.label-field", "nope"]) == 1
    assert "expected 'text' and 'nope'" in capsys.readouterr().err
    assert cli(args + ["--data.path", str(base / "msgs.csv"), "--train.layers", "some"]) == 2
    assert cli(["classify", "predict", "--checkpoint", str(base / "base"), "--text", "x"]) == 1
    assert "holds a lm head, expected classifier" in capsys.readouterr().err


def test_classify_eval_all_split_scores_every_record(base, tmp_path):
    run = tmp_path / "run"
    assert cli(["classify", "train", "--checkpoint", str(base / "base"), "--data.path", str(base / "msgs.csv"),
                "--run-dir", str(run), "--train.max-steps", "2", "--train.batch-size", "8", "--train.eval-every", "0",
                "--train.save-every", "0", "--device", "cpu"]) == 0
    assert cli(["classify", "eval", "--checkpoint", str(run / "final"), "--split", "all"]) == 0
    rep = json.loads((run / "final" / "eval-all" / "report.json").read_text())
    assert rep["examples"] == 120 and sum(map(sum, rep["confusion"])) == 120
