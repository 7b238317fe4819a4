"""ember.quant: codes equal torchao's quant_primitives, the quantized linear equals dequantize-then-linear,
the kernels are batch invariant, quantized checkpoints are small and load where inference runs, and
the perplexity cost orders as it should on a trained model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ember import cli
from ember.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ember.models import Transformer, preset
from ember.quant import (QuantLinear, dequantize_int4, pack_int4, quantize_int4, quantize_int8, quantize_model,
                         unpack_int4)
from ember.quant import kernels

tq = pytest.importorskip("torchao.quantization.quant_primitives")


@pytest.mark.parametrize("shape", [(48, 64), (5, 256)])
def test_int8_codes_equal_torchao(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0] = 0.0  # an all-zero row: scale clamps at eps
    q, s = quantize_int8(w)
    s_ref, z_ref = tq.choose_qparams_affine(w, tq.MappingType.SYMMETRIC, (1, shape[1]), torch.int8, -128, 127)
    q_ref = tq.quantize_affine(w, (1, shape[1]), s_ref, z_ref, torch.int8, -128, 127)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref.view(-1)) and not z_ref.any()
    deq = tq.dequantize_affine(q_ref, (1, shape[1]), s_ref, z_ref, torch.int8, -128, 127)
    torch.testing.assert_close(q.float() * s[:, None], deq, rtol=0, atol=0)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_codes_equal_torchao_and_pack_round_trips(group):
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    w[1, :group] = torch.rand(group) + 0.5  # a one-sided group
    q, s, z = quantize_int4(w, group)
    kw = dict(scale_dtype=torch.float16, zero_point_dtype=torch.float16)
    s_ref, z_ref = tq._choose_qparams_affine_tinygemm(w, tq.MappingType.ASYMMETRIC, (1, group), torch.int32, 0, 15, **kw)
    q_ref = tq._quantize_affine_tinygemm(w, (1, group), s_ref, z_ref, torch.int32, 0, 15)
    assert torch.equal(q.long(), q_ref.long())
    assert torch.equal(s, s_ref.view(40, -1)) and torch.equal(z, z_ref.view(40, -1))
    packed = pack_int4(q, group)
    assert packed.shape == (40, 128) and torch.equal(unpack_int4(packed, group), q)
    deq = tq._dequantize_affine_tinygemm(q_ref, (1, group), s_ref, z_ref, torch.int32, 0, 15)
    torch.testing.assert_close(dequantize_int4(packed, s, z, group), deq.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_quantized_linear_equals_dequantize_then_linear(method, group, rows, bias, backend, monkeypatch):
    if backend == "kernels" and not kernels.available():
        pytest.skip("no C compiler: the kernels are not built")
    if backend == "torch":
        monkeypatch.setattr(kernels, "available", lambda: False)
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(256, 200, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(200, 256, generator=g) * 0.05)
    q = QuantLinear.from_linear(lin, method, group)
    x = torch.randn(2, rows, 256, generator=g)
    with torch.no_grad():
        ref = F.linear(x, q.dequantized(), q.bias)
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
        q.rowwise = True
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not kernels.available(), reason="no C compiler: the kernels are not built")
@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 64)])
def test_kernels_are_batch_invariant(method, group, set_threads):
    set_threads(2)
    lin = torch.nn.Linear(192, 130)
    q = QuantLinear.from_linear(lin, method, group)
    q.rowwise = True
    x = torch.randn(37, 192, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = q(x)
        for i in (0, 5, 36):
            assert torch.equal(q(x[i:i + 1]), full[i:i + 1])
        assert torch.equal(q(x[4:12]), full[4:12])


CHAIN = torch.softmax(2.0 * torch.randn(64, 64, generator=torch.Generator().manual_seed(123)), dim=-1)


def _markov_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """Samples of one fixed Markov chain with graded transition probabilities (a tiny model learns it in a
    few hundred steps, and any error in its weights costs perplexity)."""
    probs = CHAIN
    g = torch.Generator().manual_seed(seed)  # its samples
    toks = [0]
    for _ in range(n - 1):
        toks.append(int(torch.multinomial(probs[toks[-1]], 1, generator=g)))
    return torch.tensor(toks)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained for 300 steps on a Markov chain, saved; with held-out tokens."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=64, n_embd=128, n_head=4, ffn_hidden=256, block_size=64))
    model.init_weights(0)
    data = _markov_tokens(20000)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / 300)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(data) - 65, (16,), generator=g)
        batch = torch.stack([data[i:i + 65] for i in idx])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    root = tmp_path_factory.mktemp("quant")
    ckpt = save_checkpoint(model.eval(), root / "fp32")
    held = _markov_tokens(65 * 32, seed=1).view(32, 65)
    return ckpt, held


def _ppl(model, held) -> float:
    """exp of the expected cross-entropy to the chain's true next-token distribution (no sampling noise)."""
    with torch.no_grad():
        logp = F.log_softmax(model(held[:, :-1]), dim=-1)
        return math.exp(-(CHAIN[held[:, :-1]] * logp).sum(-1).mean().item())


def test_perplexity_order_file_sizes_and_reload(trained, tmp_path):
    ckpt, held = trained
    base, _ = load_checkpoint(ckpt)
    ppl = {"fp32": _ppl(base, held)}
    size = {"fp32": (ckpt / "model.safetensors").stat().st_size}
    for name, args in {"int8": ["--method", "int8"], "int4-g32": ["--method", "int4", "--group-size", "32"],
                       "int4-g128": ["--method", "int4", "--group-size", "128"]}.items():
        out = tmp_path / name
        assert cli.main(["quantize", "--checkpoint", str(ckpt), "--out", str(out), *args]) == 0
        model, meta = load_checkpoint(out, quantized=True)
        assert meta["quant"]["method"] == name[:4] and isinstance(model.output, QuantLinear)
        ppl[name], size[name] = _ppl(model, held), (out / "model.safetensors").stat().st_size
    assert ppl["fp32"] < 20, ppl  # the model learned the chain (uniform would be 64)
    assert abs(ppl["int8"] / ppl["fp32"] - 1) < 0.01, ppl
    assert ppl["fp32"] < min(ppl["int4-g32"], ppl["int4-g128"]), ppl
    # finer groups reconstruct the weights better (on this near-Gaussian tiny model the two int4
    # perplexities differ by < 0.1%; on SmolLM2 g32 < g64 clearly: docs/compression.md)
    err = {name: ((m.dequantized() - base.get_submodule(n).weight).norm() / base.get_submodule(n).weight.norm()).item()
           for name in ("int4-g32", "int4-g128")
           for n, m in load_checkpoint(tmp_path / name, quantized=True)[0].named_modules()
           if n == "layers.0.feed_forward.w2"}
    assert err["int4-g32"] < err["int4-g128"], err
    assert size["int8"] < 0.3 * size["fp32"] and size["int4-g32"] < 0.2 * size["fp32"], size
    assert size["int4-g128"] < size["int4-g32"] < size["int8"], size
    with pytest.raises(CheckpointError, match="inference only"):
        load_checkpoint(tmp_path / "int8")  # training commands load without quantized=True


def test_tied_head_and_embedding_share_one_set_of_codes(tmp_path):
    model = Transformer(preset("tiny"))
    model.init_weights(0)
    spec = quantize_model(model.eval(), "int8")
    assert spec.tied and spec.embedding and "output" in spec.modules
    names = set(model.state_dict())
    assert "output.qweight" in names and not any(n.startswith("tok_embeddings") for n in names)
    ids = torch.tensor([[3, 7, 500]])
    torch.testing.assert_close(model.tok_embeddings(ids)[0], model.output.dequantized()[ids[0]])


def test_a_tied_head_kept_float_keeps_its_embedding_float_and_reloads(tmp_path):
    model = Transformer(preset("tiny"))
    model.init_weights(0)
    ckpt = save_checkpoint(model.eval(), tmp_path / "fp32")
    assert cli.main(["quantize", "--checkpoint", str(ckpt), "--skip", "output", "--out", str(tmp_path / "q")]) == 0
    q, meta = load_checkpoint(tmp_path / "q", quantized=True)
    assert not meta["quant"]["embedding"] and "output" not in meta["quant"]["modules"]
    assert q.output.weight is q.tok_embeddings.weight  # still tied, still float
    torch.testing.assert_close(q.tok_embeddings.weight, model.tok_embeddings.weight, rtol=0, atol=0)
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() < 0.05 * model(x).abs().max()


def test_quantized_checkpoint_generates_evaluates_and_serves(tmp_path):
    from ember.infer import api
    from ember.infer.generate import generate
    from ember.infer.sample import SamplingParams
    from ember.tokenizer import train_bpe

    text = "the quick brown fox jumps over the lazy dog. " * 40
    tok = train_bpe(iter([text]), vocab_size=300)
    tok.save(tmp_path / "tok")
    model = Transformer(preset("tiny-llama", vocab_size=tok.vocab_size, block_size=96))
    model.init_weights(0)
    save_checkpoint(model.eval(), tmp_path / "fp32", tokenizer_dir=tmp_path / "tok")
    q = tmp_path / "int4"
    assert cli.main(["quantize", "--checkpoint", str(tmp_path / "fp32"), "--method", "int4", "--group-size", "32",
                     "--out", str(q)]) == 0
    qm, qtok = api.load(q)
    prompt = qtok.encode("the quick")
    ids = generate(qm, [prompt], 12, SamplingParams(temperature=0), vocab_limit=qtok.vocab_size)[0]
    seq = list(prompt)  # the engine's cached decode == the uncached model's greedy argmax, token by token
    with torch.no_grad():
        for _ in range(len(ids)):
            seq.append(int(qm(torch.tensor([seq]))[0, -1, : qtok.vocab_size].argmax()))
    assert ids == seq[len(prompt):]
    if kernels.available():  # one prompt: the batch-1 block step over fused quantized q|k|v and gate|up
        from ember.infer.decode import QuantBlockDecoder
        from ember.infer.engine import Engine, EngineConfig

        eng = Engine(qm, EngineConfig(block_size=8, num_blocks=8, max_num_seqs=1, batch_invariant=False))
        assert eng.runner.decoders and all(isinstance(d, QuantBlockDecoder) for d in eng.runner.decoders)
    assert cli.main(["generate", "--checkpoint", str(q), "--prompt", "the quick", "--temperature", "0",
                     "--max-new-tokens", "4"]) == 0
    (tmp_path / "notes.txt").write_text(text)
    from ember.recipes.evaluate import Config, main

    assert main(Config(checkpoint=str(q), tasks=f"ppl:{tmp_path / 'notes.txt'}", out=str(tmp_path / "ev"),
                       progress=False)) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    assert next(iter(res.values()))["metrics"]["word_perplexity"] > 1
    import http.client

    from ember.infer.engine import EngineConfig
    from ember.recipes.serve import Config as ServeConfig, ServerThread

    server = ServerThread(ServeConfig(checkpoint=str(q), engine=EngineConfig(block_size=8, kv_memory_mb=8)))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "int4", "prompt": "the quick", "max_tokens": 4,
                                                                 "temperature": 0}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["choices"][0]["text"]
    finally:
        server.stop()


def test_bad_quantize_arguments_are_clear_errors(trained, tmp_path, capsys):
    ckpt, _ = trained
    assert cli.main(["quantize", "--checkpoint", str(ckpt), "--method", "int4", "--group-size", "48",
                     "--out", str(tmp_path / "x")]) != 0
    assert "group" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["quantize", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q8")]) == 0
    assert cli.main(["quantize", "--checkpoint", str(tmp_path / "q8"), "--out", str(tmp_path / "again")]) != 0
    assert "already quantized" in capsys.readouterr().err
