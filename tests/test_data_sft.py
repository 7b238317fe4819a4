"""ember.data.sft: assistant-only labels for any template (== transformers' assistant mask where a template
has generation markers), record layouts and errors, packing == unpacked per-document loss, resume."""

from __future__ import annotations

import json

import pytest
import torch

from ember.data import sft
from ember.errors import EmberError
from ember.tokenizer import Tokenizer, train_bpe

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, of course."}]

# ChatML with {% generation %} markers around what the assistant must learn (content + <|im_end|>)
MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
          "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
          "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    texts = ["Name a colour. Blue. Green, of course. Another? Be brief. hello world\n"] * 40
    return train_bpe(texts, vocab_size=300)


def _learned(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != sft.IGNORE])


def test_chatml_labels_cover_assistant_turns_and_their_end_token(tok):
    ids, labels = sft.chat_example(tok, CHAT)
    assert ids == tok.encode_chat(CHAT, add_generation_prompt=False)
    assert _learned(tok, ids, labels) == "Blue.<|im_end|>Green, of course.<|im_end|>"
    ids, labels = sft.chat_example(tok, CHAT, train_on_prompt=True)
    assert labels == ids


def test_assistant_mask_equals_transformers_on_a_marker_template(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = tok.save(tmp_path / "tok")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = MARKED
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = Tokenizer.load(d)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    out = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = sft.chat_example(ours, CHAT)  # no markers needed: prefix diffs
    assert ids == out["input_ids"]
    assert [int(lab != sft.IGNORE) for lab in labels] == out["assistant_masks"]


def test_record_layouts_and_bad_records(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"messages": CHAT},
            {"prompt": "hello", "completion": " world"},
            {"messages": [{"role": "assistant", "content": "I start?"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            {"text": "no layout"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    cfg = sft.SFTDataConfig(path=str(path), system="Be brief.")
    with pytest.raises(EmberError, match=r"d.jsonl:4: roles \['assistant'\].*HINT: fix the record, or pass --data.skip-bad"):
        sft.load_examples(path, tok, cfg)
    cfg.skip_bad_records = True
    stats = sft.SFTStats()
    ex = sft.load_examples(path, tok, cfg, stats)
    assert len(ex) == 3 and stats.records == 7 and stats.bad_records == 4
    alpaca, chat, text = ex
    assert tok.decode(alpaca[0]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert _learned(tok, *alpaca) == "Blue.<|im_end|>"
    assert _learned(tok, *text) == " world<|endoftext|>"  # the completion and its EOS


def test_all_masked_examples_are_skipped_and_eos_is_learned_when_pad_is_eos(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    long_user = "hello world " * 80
    path.write_text(json.dumps({"messages": [{"role": "user", "content": long_user},
                                             {"role": "assistant", "content": "Blue."}]}) + "\n"
                    + json.dumps({"prompt": "hi", "completion": " world"}) + "\n")
    cfg = sft.SFTDataConfig(path=str(path), max_length=32)  # right truncation cuts the whole answer off
    stats = sft.SFTStats()
    ex = sft.load_examples(path, tok, cfg, stats)
    assert len(ex) == 1 and stats.all_masked == 1 and stats.truncated == 1
    batch = sft.pad_batch(ex + [(ex[0][0][:3], ex[0][1][:3])], pad_id=tok.eos_id)  # pad == EOS
    row = batch["labels"][0].tolist()
    assert tok.eos_id in row  # padding is masked by position, so the EOS stays a target
    assert batch["labels"][1, 2:].eq(sft.IGNORE).all()  # the short row's padding is not


def test_packed_loss_equals_per_document_loss(tok):
    from ember.models import Transformer, preset
    from ember.train.loss import LMLoss, LossConfig

    model = Transformer(preset("tiny-llama", vocab_size=320))
    model.init_weights(0)
    model.eval()
    docs = [sft.chat_example(tok, CHAT), sft.chat_example(tok, CHAT[:3]), sft.text_example(tok, "hello", " world")]
    packed = sft.pack_rows(docs, pad_id=0, length=sum(len(i) - 1 for i, _ in docs) + 3)
    assert packed["input_ids"].shape[0] == 1  # all three in one row
    for fused in (False, True):
        lm = LMLoss(LossConfig(fused=fused))
        with torch.no_grad():
            out = lm(model, packed)
            per_doc = [lm(model, sft.pad_batch([d], 0)) for d in docs]
        assert out.weight == sum(o.weight for o in per_doc)
        torch.testing.assert_close(out.loss, sum(o.loss for o in per_doc), rtol=1e-6, atol=1e-5)


def test_loader_resumes_exactly_and_groups_lengths(tok):
    ex = [sft.text_example(tok, "hello " * (i % 7), " world" * (1 + i % 5)) for i in range(40)]
    a = sft.SFTLoader(ex, 4, pad_id=0, seed=3)
    seq = [a.next_batch()["input_ids"] for _ in range(14)]  # crosses an epoch (10 batches each)
    b = sft.SFTLoader(ex, 4, pad_id=0, seed=3)
    for _ in range(6):
        b.next_batch()
    c = sft.SFTLoader(ex, 4, pad_id=0, seed=3)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(c.next_batch()["input_ids"], s) for s in seq[6:])
    with pytest.raises(EmberError, match="batch_size"):
        sft.SFTLoader(ex, 8, pad_id=0, seed=3).load_state_dict(b.state_dict())
    r0, r1 = (sft.SFTLoader(ex, 4, pad_id=0, seed=3, dp_rank=r, dp_size=2) for r in (0, 1))
    assert not torch.equal(r0.next_batch()["input_ids"], r1.next_batch()["input_ids"])
