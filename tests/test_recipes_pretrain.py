"""`ember pretrain` end to end on a tiny prepared dataset, plus `ember plot`, the config and the helpers."""

import json
import math

import pytest
import torch

from ember.cli import main as cli
from ember.errors import EmberError
from ember.data.stats import unigram_entropy
from ember.models import pad_vocab
from ember.recipes.pretrain import Config, build_model_config


def tiny_args(data_dir, run_dir, *extra):
    return ["pretrain", "--model-preset", "tiny", "--data.data-dir", str(data_dir), "--data.block-size", "64",
            "--run-dir", str(run_dir), "--train.batch-size", "4", "--train.max-steps", "8", "--train.warmup-steps", "2",
            "--train.eval-every", "4", "--train.eval-batches", "2", "--train.log-every", "1", "--train.save-every", "4",
            "--samples.num", "2", "--samples.max-new-tokens", "8", "--device", "cpu", *extra]


def test_pretrain_end_to_end_and_plot(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(tiny_args(tiny_data, run)) == 0
    out = capsys.readouterr().out
    assert "unigram baseline" in out and "--- sample" in out
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in recs if r["split"] == "val"] == [4, 8]
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]
    assert (run / "config.yaml").is_file() and (run / "run.json").is_file()
    result = json.loads((run / "result.json").read_text())
    assert result["step"] == 8 and result["unigram_entropy"] > 0

    from ember.tokenizer import Tokenizer
    from ember.io.checkpoint import load_checkpoint

    model, meta = load_checkpoint(run / "final")
    assert model.cfg.vocab_size == 512 and model.cfg.n_layer == 2 and meta["extra"]["step"] == 8
    assert Tokenizer.load(run / "final" / "tokenizer").vocab_size <= 512
    # the exported weights are the trained ones: same val loss as the run reported
    from ember.data.loader import TokenLoader
    from ember.train.loss import cross_entropy

    val = TokenLoader(tiny_data, "val", 64, 4)
    with torch.no_grad():
        losses = [cross_entropy(model(x), y).item() for x, y in val.iter_eval(2)]
    assert sum(losses) / len(losses) == pytest.approx(result["val_loss"], abs=1e-5)

    # export of a training checkpoint == final export
    from ember.train.state import export_to_safetensors

    export_to_safetensors(run / "checkpoints" / "step_0000008", tmp_path / "exported")
    m2, _ = load_checkpoint(tmp_path / "exported")
    for (n, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n

    assert cli(["plot", str(run)]) == 0
    for name in ("loss", "lr", "throughput", "overview"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000


def test_plot_without_metrics_is_clear_error(tmp_path, capsys):
    assert cli(["plot", str(tmp_path)]) == 1
    assert "no metrics file" in capsys.readouterr().err


def test_old_run_moved_aside_not_deleted(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(tiny_data, run, "--train.max-steps", "2", "--samples.num", "0", "--train.eval-every", "0")
    assert cli(args) == 0
    assert cli(args) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(aside) == 1 and (aside[0] / "final" / "model.safetensors").is_file()


def test_resume_without_checkpoint_is_clear_error(tiny_data, tmp_path, capsys):
    assert cli(tiny_args(tiny_data, tmp_path / "none", "--resume")) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_model_config_from_preset_overrides_and_data_vocab():
    cfg = Config(model_preset="small")
    cfg.model.n_layer = 6
    mc = build_model_config(cfg, data_vocab=4000)
    assert mc.n_layer == 6 and mc.n_embd == 256 and mc.vocab_size == 4032
    assert pad_vocab(4096) == 4096 and pad_vocab(50257) == 50304
    cfg.model.vocab_size = 100
    with pytest.raises(EmberError, match="smaller than the tokenizer"):
        build_model_config(cfg, data_vocab=4000)
    with pytest.raises(EmberError, match="preset"):
        build_model_config(Config(model_preset="smal"), None)


def test_unigram_entropy():
    assert unigram_entropy(torch.tensor([5, 5, 5, 5, 0])) == pytest.approx(math.log(4))
    assert unigram_entropy(torch.tensor([7])) == pytest.approx(0.0)


def test_small_yaml_is_the_default():
    from pathlib import Path

    from ember.config import load_yaml, to_dict

    path = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "small.yaml"
    assert to_dict(load_yaml(path, Config)) == to_dict(Config())


def test_failed_start_moves_nothing_aside_and_resume_names_the_aside(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = tiny_args(tiny_data, run, "--train.max-steps", "2", "--samples.num", "0", "--train.eval-every", "0")
    assert cli(args) == 0
    for bad in (["--data.data-dir", str(tmp_path / "nowhere")], ["--data.block-size", "100000"],
                ["--model-preset", "smal"]):
        assert cli(args + bad) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no RUN_DIR.<time> piled up
    capsys.readouterr()
    assert cli(args) == 0  # a real start moves the old run aside
    aside = next(p for p in tmp_path.iterdir() if p.name.startswith("run."))
    import shutil

    shutil.rmtree(run / "checkpoints")
    assert cli(args + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert f"moved aside to {aside}" in err and "--resume-from" in err


def test_resume_reports_config_changes_and_the_new_lr_applies(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    base = tiny_args(tiny_data, run, "--samples.num", "0", "--train.eval-every", "0", "--train.warmup-steps", "0",
                     "--train.schedule", "constant")
    assert cli(base + ["--stop-at", "4"]) == 0
    capsys.readouterr()
    assert cli(base + ["--resume", "--train.lr", "0.0005"]) == 0
    out = capsys.readouterr()
    assert "config change" in out.err and "train.lr: 0.002 -> 0.0005" in out.err and "train.betas" not in out.err
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in recs if r["split"] == "train"}
    assert lrs[4] == pytest.approx(2e-3) and lrs[5] == pytest.approx(5e-4)


@pytest.mark.parametrize("flags, msg", [
    (["--train.lr", "-1"], "train.lr=-1.0: expected a finite number >= 0"),
    (["--train.lr", "nan"], "train.lr=nan"),
    (["--train.max-steps", "0"], "train.max_steps=0: expected at least 1"),
    (["--train.grad-accum-steps", "0"], "grad_accum_steps=0"),
    (["--model.dropout", "1.5"], "dropout=1.5"),
    (["--device", "tpu"], "device='tpu'"),
])
def test_nonsense_flags_are_one_line_errors(tiny_data, tmp_path, capsys, flags, msg):
    assert cli(tiny_args(tiny_data, tmp_path / "r", *flags)) in (1, 2)
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_every_model_config_field_is_an_override():
    import dataclasses

    from ember.config import attribute_docs
    from ember.models import ModelConfig
    from ember.recipes.pretrain import ModelOverrides

    names = {f.name for f in dataclasses.fields(ModelOverrides)}
    assert names == {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = Config(model_preset="tiny-llama")
    cfg.model.norm_eps = 1e-6
    cfg.model.mask = "prefix"
    cfg.model.head_dim = 32
    cfg.model.rope_scaling.factor = 4.0
    mc = build_model_config(cfg, None)
    assert (mc.norm_eps, mc.mask, mc.head_dim, mc.rope_scaling.factor) == (1e-6, "prefix", 32, 4.0)
    assert mc.rope_scaling.original_max_position_embeddings == 8192  # the rest of the defaults
    assert attribute_docs(ModelConfig)["norm_eps"] == "Epsilon of the normalisation layers."


def test_unwritable_run_dir_is_a_clear_error(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli(tiny_args(tiny_data, blocker / "run")) == 1
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "Traceback" not in err
