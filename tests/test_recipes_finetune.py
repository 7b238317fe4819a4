"""`ember finetune` end to end on a tiny checkpoint: LoRA and full fine-tuning, the adapter checkpoint
loads in generate, --merge equals the adapter, training checkpoints hold adapters only, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch

from ember.cli import main as cli


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from ember.io.checkpoint import save_checkpoint
    from ember.models import Transformer, preset
    from ember.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("ft")
    texts = ["Name a colour. Blue. Green, of course. What is two plus two? Four. hello world\n"] * 40
    train_bpe(texts, vocab_size=300).save(root / "tok")
    model = Transformer(preset("tiny-llama", vocab_size=320, block_size=128))
    model.init_weights(0)
    save_checkpoint(model, root / "base", tokenizer_dir=root / "tok")
    rows = []
    for i in range(24):
        rows.append({"instruction": f"Name colour number {i}.", "input": "", "output": ["Blue.", "Green."][i % 2]})
        rows.append({"messages": [{"role": "user", "content": "What is two plus two?"},
                                  {"role": "assistant", "content": "Four."}]})
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def args(base, run, *extra):
    return ["finetune", "--checkpoint", str(base / "base"), "--data.path", str(base / "data.jsonl"),
            "--run-dir", str(run), "--train.max-steps", "6", "--train.batch-size", "4", "--train.warmup-steps", "1",
            "--train.eval-every", "3", "--train.eval-batches", "2", "--train.save-every", "3", "--train.log-every", "1",
            "--train.lr", "0.01", "--data.max-length", "64", "--device", "cpu", *extra]


def _losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def test_lora_finetune_adapter_checkpoint_merge_and_resume(base, tmp_path, capsys):
    from ember.io.checkpoint import load_checkpoint
    from ember.io.safe import load_dcp_metadata
    from ember.train.state import latest_checkpoint

    run = tmp_path / "lora"
    lora = ["--lora.r", "4", "--lora.alpha", "8", "--lora.targets", "all-linear"]
    assert cli(args(base, run, *lora)) == 0
    out = capsys.readouterr().out
    assert "trainable of" in out and "LoRA r=4" in out
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]  # it learns
    final = run / "final"
    meta = json.loads((final / "ember.json").read_text())
    assert meta["adapter"]["base"] == str((base / "base").resolve()) and not (final / "model.safetensors").exists()
    assert (final / "adapter" / "adapter_config.json").is_file()
    keys = load_dcp_metadata(latest_checkpoint(run) / "dcp" / ".metadata").state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)  # the frozen base is not in the checkpoint

    tuned, _ = load_checkpoint(final)
    plain, _ = load_checkpoint(base / "base")
    x = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (tuned(x) - plain(x)).abs().max() > 1e-4
    assert cli(["generate", "--checkpoint", str(final), "--prompt", "What is two plus two?", "--max-new-tokens", "3",
                "--temperature", "0"]) == 0

    merged = tmp_path / "merged"
    assert cli(args(base, merged, *lora, "--merge")) == 0
    m, meta = load_checkpoint(merged / "final")
    assert "adapter" not in meta and (merged / "final" / "model.safetensors").is_file()
    assert (merged / "final.adapter" / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        torch.testing.assert_close(m(x), tuned(x), rtol=1e-5, atol=1e-5)  # same run, same seed: same adapter
    transformers = pytest.importorskip("transformers")  # the merged weights export and load in transformers
    assert cli(["convert", "--to-hf", str(merged / "final"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, m(x), rtol=1e-5, atol=1e-5)

    resumed = tmp_path / "resumed"
    assert cli(args(base, resumed, *lora, "--stop-at", "3")) == 0
    assert not (resumed / "final").exists()
    assert cli(args(base, resumed, *lora, "--resume")) == 0
    assert _losses(resumed) == losses


def test_full_finetune_and_bad_inputs(base, tmp_path, capsys):
    from ember.io.checkpoint import load_checkpoint

    run = tmp_path / "full"
    assert cli(args(base, run, "--train.lr", "0.001")) == 0
    m, meta = load_checkpoint(run / "final")
    assert meta["extra"]["step"] == 6 and (run / "final" / "tokenizer").is_dir()
    assert cli(["finetune", "--checkpoint", str(base / "base")]) == 1
    assert "--data.path is required" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert cli(args(base, tmp_path / "b", "--data.path", str(tmp_path / "bad.jsonl"))) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1: no assistant turn" in err and "Traceback" not in err
    assert cli(args(base, tmp_path / "c", "--data.max-length", "4096")) == 1
    assert "exceeds the model's context" in capsys.readouterr().err


def test_qlora_merge_writes_a_parity_report(base, tmp_path, capsys):
    from ember.io.checkpoint import load_checkpoint

    run = tmp_path / "q"
    assert cli(args(base, run, "--lora.r", "4", "--lora.targets", "all-linear", "--quant", "nf4", "--merge")) == 0
    out = capsys.readouterr().out
    assert "QLoRA:" in out and "bytes each" in out
    rep = json.loads((run / "final.parity.json").read_text())
    into_dq = rep["merged into dequantized base"]
    into_fp32 = rep["merged into original fp32 base"]
    assert into_dq["max_abs_dlogit_vs_qlora"] < 1e-3  # the merge reproduces what was trained
    assert into_fp32["max_abs_dlogit_vs_qlora"] > 10 * into_dq["max_abs_dlogit_vs_qlora"]
    model, meta = load_checkpoint(run / "final")
    assert meta["extra"]["base_quant"] == "nf4"
    # the same run without --merge: its adapter checkpoint loads onto the NF4-round-tripped base it saw
    unmerged = tmp_path / "q2"
    assert cli(args(base, unmerged, "--lora.r", "4", "--lora.targets", "all-linear", "--quant", "nf4")) == 0
    adapted, meta2 = load_checkpoint(unmerged / "final")
    assert "adapter" in meta2
    x = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x), rtol=1e-4, atol=1e-4)
    assert cli(["finetune", "--checkpoint", str(base / "base"), "--data.path", str(base / "data.jsonl"),
                "--quant", "nf4"]) == 1
    assert "quantizes the frozen base of a LoRA run" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_finetune_under_fsdp2_equals_one_process(base, tmp_path):
    """`ember finetune --nproc-per-node 2` (FSDP2, gloo) with LoRA: the same losses as 1 process on the same
    global batch, and an adapter checkpoint that loads."""
    from ember.io.checkpoint import load_checkpoint

    lora = ["--lora.r", "4", "--lora.targets", "all-linear", "--train.eval-every", "0", "--train.save-every", "0"]
    assert cli(args(base, tmp_path / "one", *lora, "--train.batch-size", "4")) == 0
    assert cli(args(base, tmp_path / "two", *lora, "--train.batch-size", "2", "--nproc-per-node", "2",
                    "--parallel.data-parallel", "fsdp")) == 0
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    assert [two[s] for s in one] == pytest.approx([one[s] for s in one], abs=1e-5)
    load_checkpoint(tmp_path / "two" / "final")
