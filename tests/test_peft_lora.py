"""LoRA: a no-op at init, merged == unmerged, gradients on adapters only, disabled == base, and PEFT
loads ember's adapter onto the HF export with equal logits."""

from __future__ import annotations

import pytest
import torch

from ember.io.adapter import load_adapter, save_adapter
from ember.models import Transformer, preset
from ember.peft import LoRAConfig, adapters_disabled, apply_lora, lora_state_dict, merge_lora


def _model(name="tiny-llama", seed=0, **over):
    m = Transformer(preset(name, **over))
    m.init_weights(seed)
    return m.eval()


def _tokens(B=2, T=12, seed=1):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def _train_b(model, seed=2):
    """Give every B a random value, as training would (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_init_is_a_no_op_and_merge_matches(name):
    m = _model(name)
    x = _tokens()
    with torch.no_grad():
        ref = m(x)
    paths = apply_lora(m, LoRAConfig(r=4, alpha=8, targets=["all-linear"]))
    assert len(paths) == m.cfg.n_layer * (7 if name == "tiny-llama" else 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)  # B = 0: exactly the base model
    _train_b(m)
    with torch.no_grad():
        tuned = m(x)
        with adapters_disabled(m):
            torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    assert (tuned - ref).abs().max() > 1e-3
    assert merge_lora(m) == len(paths) and not lora_state_dict(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x), tuned, rtol=1e-5, atol=1e-5)


def test_gradients_only_on_adapters_and_rslora_scale():
    m = _model()
    cfg = LoRAConfig(r=4, alpha=8, targets=["q", "v", "down"], rslora=True)
    apply_lora(m, cfg)
    assert m.layers["0"].attention.wq.scale == pytest.approx(8 / 2)  # alpha / sqrt(r)
    m.train()
    _train_b(m)
    m(_tokens()).logsumexp(-1).mean().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(m.named_parameters()) if ".lora_" in n}
    assert len(trainable) == 2 * 3 * m.cfg.n_layer
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n in trainable)


def test_adapter_round_trip(tmp_path):
    m = _model()
    cfg = LoRAConfig(r=4, alpha=16, targets=["q", "k", "v", "o", "gate", "up", "down"])
    apply_lora(m, cfg)
    _train_b(m)
    save_adapter(m, m.cfg, cfg, tmp_path / "adapter")
    fresh = _model()
    got = load_adapter(fresh, fresh.cfg, tmp_path / "adapter")
    assert got.roles() == cfg.roles() and got.r == 4 and got.alpha == 16
    with torch.no_grad():
        torch.testing.assert_close(fresh(_tokens()), m(_tokens()), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_peft_loads_embers_adapter_on_the_hf_export(case, tmp_path):
    """ember model + adapter == transformers model (ember's HF export) + PEFT with ember's adapter."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from ember.io.checkpoint import save_checkpoint
    from ember.recipes.convert import to_hf

    name, targets = ("tiny-llama", ["all-linear"]) if case == "llama" else ("tiny", ["o", "up", "down"])
    m = _model(name)
    save_checkpoint(m, tmp_path / "base")
    to_hf(tmp_path / "base", tmp_path / "hf")
    cfg = LoRAConfig(r=4, alpha=8, targets=targets, dropout=0.0)
    apply_lora(m, cfg)
    _train_b(m)
    save_adapter(m, m.cfg, cfg, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    tuned = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    x = _tokens()
    with torch.no_grad():
        ours, theirs = m(x), tuned(input_ids=x).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        with tuned.disable_adapter():
            base = tuned(input_ids=x).logits
    assert (base - ours).abs().max() > 1e-3  # the adapter really changes the output
    # and the other way: PEFT's saved adapter loads into ember
    tuned.save_pretrained(tmp_path / "peft_saved")
    again = _model(name)
    load_adapter(again, again.cfg, tmp_path / "peft_saved")
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours, rtol=1e-5, atol=1e-5)


def test_gpt2_qkv_adapters_are_refused_with_a_hint(tmp_path):
    from ember.errors import EmberError

    m = _model("tiny")
    cfg = LoRAConfig(r=2, targets=["q", "v"])
    apply_lora(m, cfg)
    with pytest.raises(EmberError, match="c_attn.*--merge"):
        save_adapter(m, m.cfg, cfg, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_bad_lora_config_values():
    for kw, msg in ((dict(r=-1), "lora.r=-1"), (dict(r=4, dropout=1.0), "lora.dropout"),
                    (dict(r=4, targets=["qq"]), "lora.targets")):
        with pytest.raises(ValueError, match=msg):
            LoRAConfig(**kw)


def test_qlora_nf4_base_matches_torchao_and_trains_adapters_only():
    import warnings

    from ember.peft.qlora import nf4_bytes, nf4_round_trip, quantize_base_nf4

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import to_nf4
    m = _model("tiny-llama")
    ref_w = m.layers["0"].attention.wq.weight.detach().clone()
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, LoRAConfig(r=4, alpha=8, targets=["q", "v"]))
    assert quantize_base_nf4(m) == 7 * m.cfg.n_layer  # adapted and plain block linears alike
    ours = m.layers["0"].attention.wq.weight
    from ember.peft.qlora import scaler_block

    theirs = to_nf4(ref_w, block_size=64, scaler_block_size=scaler_block(ref_w))
    assert torch.equal(ours.quantized_data, theirs.quantized_data)  # the same codes as torchao
    assert torch.equal(ours.quantized_scalers, theirs.quantized_scalers)
    nbytes, params = nf4_bytes(m)
    assert nbytes / params <= 0.6
    # at init the model is the base with NF4 round-tripped block weights
    rt = Transformer(m.cfg)
    rt.load_state_dict({k: nf4_round_trip(v) if k.startswith("layers.") and v.dim() == 2 else v
                        for k, v in base_sd.items()})
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(m(x), rt.eval()(x), rtol=1e-5, atol=1e-5)
    m.train()
    m(x).logsumexp(-1).mean().backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == \
        {n for n, _ in m.named_parameters() if ".lora_" in n}


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("EMBER_TEST_COMPILE"),
                    reason="torch.compile takes ~35 s on 2 cores: set EMBER_TEST_COMPILE=1")
def test_lora_blocks_compile_with_the_same_gradients():
    from ember.parallel.parallelize import apply_compile
    from ember.train.loss import LMLoss

    def make():
        m = _model()
        apply_lora(m, LoRAConfig(r=4, targets=["all-linear"]))
        _train_b(m)
        return m.train()

    eager, comp = make(), make()
    apply_compile(comp)
    x, y = _tokens(), _tokens(seed=5)
    for m in (eager, comp):
        out = LMLoss()(m, (x, y))
        (out.loss / out.weight).backward()
    ge = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    gc = {n.replace("_orig_mod.", ""): p.grad for n, p in comp.named_parameters() if p.grad is not None}
    assert set(ge) == set(gc) and all(".lora_" in n for n in ge)
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-5, atol=1e-6)
