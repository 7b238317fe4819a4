"""ember.recipes.model_info: counts cross-checked against built models, FLOPs and memory arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from ember.errors import EmberError
from ember.models import PRESETS, Transformer, preset
from ember.recipes.model_info import BYTES_PER_PARAM, Config, main, model_stats, resolve


@pytest.mark.parametrize("name", list(PRESETS))
def test_counts_match_built_model_and_config(name):
    cfg = preset(name)
    stats = model_stats(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    p = stats["params"]
    assert p["total"] == model.num_params() == cfg.num_params()
    assert p["non_embedding"] == model.num_params(embedding=False) == cfg.num_params(embedding=False)
    assert p["embedding"] + p["non_embedding"] == p["total"]
    assert sum(p["by_component"].values()) == p["total"]
    assert p["by_component"]["embedding"] == p["embedding"]
    assert stats["flops_per_token"]["train"] == cfg.flops_per_token(cfg.block_size)


def test_known_sizes():
    assert model_stats(preset("gpt2"))["params"]["total"] == 124_475_904
    assert abs(model_stats(preset("llama-3-70b"))["params"]["total"] / 70.55e9 - 1) < 1e-3
    assert abs(model_stats(preset("llama-3-8b"))["params"]["total"] / 8.03e9 - 1) < 1e-3
    assert abs(model_stats(preset("llama-3.2-1b"))["params"]["total"] / 1.236e9 - 1) < 1e-3


def test_counts_on_a_real_model_with_every_parameter_materialised():
    cfg = preset("tiny-llama")
    model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    stats = model_stats(cfg)
    assert stats["params"]["total"] == n
    assert stats["params"]["embedding"] == model.tok_embeddings.weight.numel()  # untied head is not embedding


def test_flops_per_token():
    cfg = preset("tiny")  # tied head: the head matmul still costs FLOPs
    L, H, D, V, C = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.n_embd
    n_matmul = cfg.num_params(embedding=False) + V * C
    for T in (16, 128):
        f = model_stats(cfg, seq_len=T)["flops_per_token"]
        assert f["seq_len"] == T
        assert f["train"] == 6 * n_matmul + 12 * L * H * D * T
        assert f["forward"] == 2 * n_matmul + 4 * L * H * D * T
        assert 3 * f["forward"] == f["train"]


def test_memory_convention():
    stats = model_stats(preset("gpt2"))
    N = stats["params"]["total"]
    fp32, bf16 = stats["memory_bytes"]["fp32"], stats["memory_bytes"]["bf16"]
    assert (fp32["weights"], fp32["gradients"], fp32["adamw_moments"], fp32["total"]) == (4 * N, 4 * N, 8 * N, 16 * N)
    assert (bf16["weights"], bf16["gradients"], bf16["master_weights"], bf16["adamw_moments"]) == (2 * N, 2 * N, 4 * N, 8 * N)
    assert bf16["total"] == 16 * N
    assert set(BYTES_PER_PARAM) == {"fp32", "bf16"}
    assert "master" in stats["memory_convention"] and "Activations excluded" in stats["memory_convention"]


def test_main_prints_table_and_json(capsys):
    assert main(Config(model="tiny-llama", seq_len=64)) == 0
    out = capsys.readouterr().out
    assert "GQA" in out and "seq_len 64" in out and "non-embedding" in out
    assert main(Config(model="tiny", json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == "preset tiny" and data["params"]["total"] == preset("tiny").num_params()


def test_unknown_preset_and_bad_seq_len():
    with pytest.raises(EmberError, match="did you mean 'gpt2'"):
        resolve("gtp2")
    with pytest.raises(EmberError, match="seq-len"):
        main(Config(model="tiny", seq_len=0))


def test_checkpoint_dir(tmp_path, capsys):
    ckpt = pytest.importorskip("ember.io.checkpoint")
    cfg = preset("tiny-llama", n_layer=3)
    model = Transformer(cfg)
    model.init_weights(0)
    ckpt.save_checkpoint(model, tmp_path / "ck")
    got, source = resolve(str(tmp_path / "ck"))
    assert got == cfg and "checkpoint" in source
    assert main(Config(model=str(tmp_path / "ck"), json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["total"] == cfg.num_params()
    with pytest.raises(EmberError, match="ember.json"):
        resolve(str(tmp_path))  # a directory that is not a checkpoint
    with pytest.raises(EmberError, match="not found"):
        resolve(str(tmp_path / "missing"))
