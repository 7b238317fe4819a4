"""ember checkpoints: exact round trips, tokenizer copy, atomic saves and one clear error per bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.models import Transformer, preset
from ember.io import checkpoint as ckpt
from ember.io.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint, save_state_dict

CASES = {
    "tiny-tied": ("tiny", {}),
    "tiny-untied": ("tiny", {"tie_embeddings": False}),
    "tiny-llama-untied": ("tiny-llama", {}),
    "tiny-llama-tied": ("tiny-llama", {"tie_embeddings": True,
                                        "rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 32}}),
}


def _model(name: str = "tiny", seed: int = 0, **overrides) -> Transformer:
    model = Transformer(preset(name, **overrides))
    model.init_weights(seed=seed)
    return model.eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(case, tmp_path):
    name, overrides = CASES[case]
    model = _model(name, **overrides)
    out = save_checkpoint(model, tmp_path / "ck", extra={"step": 7})
    assert out == tmp_path / "ck"
    loaded, meta = load_checkpoint(out)
    assert not loaded.training
    assert meta["format"] == "ember-checkpoint" and meta["format_version"] == 1
    assert meta["extra"] == {"step": 7} and meta["tokenizer"] is None and meta["model"] == model.cfg.to_dict()
    assert isinstance(meta["ember_version"], str)
    a, b = model.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(_tokens()), loaded(_tokens()))
    stored = load_file(out / "model.safetensors")
    tied = model.cfg.tie_embeddings
    assert ("output.weight" in stored) == (not tied)  # a tied head is stored once
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tied
    if loaded.rope is not None:
        assert torch.equal(loaded.rope, model.rope)


def test_tokenizer_dir_is_copied_and_dtype_cast(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {}}')
    save_checkpoint(_model("tiny-llama"), tmp_path / "ck", tokenizer_dir=tok)
    assert (tmp_path / "ck" / "tokenizer" / "tokenizer.json").read_text() == '{"model": {}}'
    assert read_meta(tmp_path / "ck")["tokenizer"] == "tokenizer/"
    model, _ = load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and model.rope.dtype == torch.float32
    with pytest.raises(CheckpointError, match="nope"):
        save_checkpoint(_model(), tmp_path / "ck2", tokenizer_dir=tmp_path / "nope")


def test_save_state_dict_cleans_wrapper_names(tmp_path):
    model = _model()
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_state_dict(sd, model.cfg, tmp_path / "ck")
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.layers["1"].attention.wq.weight, model.layers["1"].attention.wq.weight)


# ------------------------------------------------------------------------------------ bad files
@pytest.fixture
def saved(tmp_path) -> Path:
    return save_checkpoint(_model(), tmp_path / "ck")


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "HINT:" in msg
    return msg


def test_missing_directory(tmp_path):
    assert "not found" in _error(tmp_path / "nowhere")


def test_missing_meta(saved):
    (saved / "ember.json").unlink()
    msg = _error(saved)
    assert "ember.json" in msg and "missing" in msg


def test_hf_dir_gets_a_convert_hint(saved):
    (saved / "ember.json").unlink()
    (saved / "config.json").write_text("{}")
    assert "ember convert --from-hf" in _error(saved)


def test_bad_json(saved):
    (saved / "ember.json").write_text('{"format": "ember-checkpoint", ')
    msg = _error(saved)
    assert "ember.json" in msg and "not valid JSON" in msg


def test_future_and_wrong_format(saved):
    meta = json.loads((saved / "ember.json").read_text())
    (saved / "ember.json").write_text(json.dumps({**meta, "format_version": 99}))
    assert "upgrade ember" in _error(saved)
    (saved / "ember.json").write_text(json.dumps({**meta, "format": "something-else"}))
    assert "ember.json" in _error(saved)
    (saved / "ember.json").write_text(json.dumps({**meta, "model": {**meta["model"], "n_wings": 2}}))
    assert "n_wings" in _error(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    msg = _error(saved)
    assert "model.safetensors" in msg and "missing" in msg


@pytest.mark.parametrize("keep", [0.5, 0.99, 4])
def test_truncated_weights(saved, keep):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    msg = _error(saved)
    assert "model.safetensors" in msg and "truncated or corrupt" in msg


def test_missing_and_unexpected_tensors(saved):
    tensors = load_file(saved / "model.safetensors")
    del tensors["layers.1.attention.wk.weight"]
    tensors["layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, saved / "model.safetensors")
    msg = _error(saved)
    assert "model.safetensors" in msg and "layers.1.attention.wk.weight" in msg and "layers.9.extra.weight" in msg


def test_state_dict_with_a_missing_tensor_is_refused_at_save(tmp_path):
    model = _model()
    sd = dict(model.state_dict())
    del sd["norm.bias"]
    with pytest.raises(CheckpointError, match="norm.bias"):
        save_state_dict(sd, model.cfg, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_shape_mismatch(tmp_path):
    save_checkpoint(_model("tiny", n_embd=32), tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "ember.json").read_text())
    meta["model"]["n_embd"] = 64
    meta["model"]["ffn_hidden"] = 256
    meta["model"]["head_dim"] = 16
    (tmp_path / "ck" / "ember.json").write_text(json.dumps(meta))
    msg = _error(tmp_path / "ck")
    assert "model.safetensors" in msg and "shape mismatch" in msg and "expected (512, 64), found (512, 32)" in msg


# ------------------------------------------------------------------------------------ atomic save
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old = _model(seed=0)
    save_checkpoint(old, tmp_path / "ck")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")

    def boom(*args, **kwargs):  # fails after model.safetensors was written into the temp dir
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.shutil, "copytree", boom)
    for target in ("ck", "fresh"):
        with pytest.raises(RuntimeError, match="disk full"):
            save_checkpoint(_model(seed=1), tmp_path / target, tokenizer_dir=tok)
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.tok_embeddings.weight, old.tok_embeddings.weight)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "tok"]  # no temp dirs left behind
