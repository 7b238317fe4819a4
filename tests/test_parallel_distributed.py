"""2-process (gloo, CPU) data parallelism == 1 process: DDP, FSDP2 variants, grad accumulation, AC, precision.

Each test launches `python -m torch.distributed.run --standalone --nproc-per-node 2 <this file> CASES OUT`
once (as users launch ember) and batches many checks into that launch; rank 0 writes the per-step losses
to OUT as JSON and the test compares them with the same steps run here in one process.

Run alone: .venv/bin/pytest tests/test_parallel_distributed.py
(torch.compile under DDP/FSDP2 is checked only with EMBER_TEST_COMPILE=1: it takes minutes on 2 cores.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ember.models import Transformer, preset
from ember.parallel import (ParallelConfig, ParallelDims, all_reduce_mean, autocast, clip_grad_norm_,
                            destroy_distributed, init_distributed, make_grad_scaler, materialize, no_sync,
                            parallelize, unwrap)

ROOT = Path(__file__).resolve().parents[1]
B, T, STEPS, MAX_NORM = 4, 16, 3, 0.5

# name -> (model preset, ParallelConfig kwargs, grad-accumulation micro-steps)
CASES = {
    "ddp": ("tiny", dict(data_parallel="ddp"), 1),
    "ddp-llama": ("tiny-llama", dict(data_parallel="ddp"), 1),
    "fsdp": ("tiny", dict(data_parallel="fsdp"), 1),
    "fsdp-llama": ("tiny-llama", dict(data_parallel="fsdp"), 1),
    "fsdp-zero2": ("tiny", dict(data_parallel="fsdp", reshard_after_forward=False), 1),
    "fsdp-zero2-llama": ("tiny-llama", dict(data_parallel="fsdp", reshard_after_forward=False), 1),
    "fsdp-offload": ("tiny", dict(data_parallel="fsdp", cpu_offload=True), 1),
    "ddp-accum": ("tiny", dict(data_parallel="ddp"), 2),
    "fsdp-accum": ("tiny", dict(data_parallel="fsdp"), 2),
    "fsdp-accum-llama": ("tiny-llama", dict(data_parallel="fsdp"), 2),
    "fsdp-ac-full": ("tiny", dict(data_parallel="fsdp", activation_checkpointing="full"), 1),
    "fsdp-ac-selective-llama": ("tiny-llama", dict(data_parallel="fsdp", activation_checkpointing="selective"), 1),
    "ddp-ac-full": ("tiny", dict(data_parallel="ddp", activation_checkpointing="full"), 1),
    # "-pre": parallelize an already initialised model (e.g. loaded weights) instead of a meta one
    "fsdp-pre": ("tiny", dict(data_parallel="fsdp"), 1),
    "ddp-pre": ("tiny", dict(data_parallel="ddp"), 1),
}
# loose-tolerance cases (low precision compute): compared with the fp32 reference to 2e-2
LOW_PRECISION = {
    "fsdp-bf16": ("tiny", dict(data_parallel="fsdp", mixed_precision="bf16"), 1),
    "fsdp-fp16": ("tiny", dict(data_parallel="fsdp", mixed_precision="fp16"), 1),
    "ddp-fp16": ("tiny", dict(data_parallel="ddp", mixed_precision="fp16"), 1),
}
COMPILE = {
    "fsdp-compile": ("tiny", dict(data_parallel="fsdp", compile=True, activation_checkpointing="full"), 1),
    "ddp-compile": ("tiny", dict(data_parallel="ddp", compile=True), 1),
}
ALL = {**CASES, **LOW_PRECISION, **COMPILE}


def global_batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, vocab, (B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]  # (B, T) inputs, (B, T) targets


def build(model_name: str, pcfg: ParallelConfig, dims: ParallelDims, on_meta: bool = True):
    """Meta build -> parallelize -> materialize(seed 0), plus AdamW and (fp16) a GradScaler.

    on_meta=False: init_weights(0) first, then parallelize the real model (no materialize).
    """
    if on_meta:
        with torch.device("meta"):
            model = Transformer(preset(model_name))
        model = parallelize(model, dims, pcfg)
        materialize(model, dims, seed=0)
    else:
        model = Transformer(preset(model_name))
        model.init_weights(0)
        model = parallelize(model, dims, pcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt, make_grad_scaler(dims, pcfg)


def train_step(model, opt, scaler, step: int, dims: ParallelDims, pcfg: ParallelConfig, accum: int = 1,
               reference: bool = False, out: dict | None = None) -> tuple[float, float]:
    """One AdamW step with clipping on global batch `step` (this rank's slice); (global mean loss, norm).

    reference=True: torch's own clip_grad_norm_ (the trusted side, on a plain model).
    """
    x, y = global_batch(step, unwrap(model).cfg.vocab_size)
    x, y = x.chunk(dims.dp_size)[dims.dp_rank], y.chunk(dims.dp_size)[dims.dp_rank]
    total = torch.zeros(())
    for i, (xi, yi) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
        with no_sync(model, i < accum - 1):
            with autocast(dims, pcfg):
                logits = model(xi)
            if out is not None:
                out["logits_dtype"] = str(logits.dtype)
            loss = F.cross_entropy(logits.float().flatten(0, 1), yi.flatten()) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(opt)
    clip = torch.nn.utils.clip_grad_norm_ if reference else clip_grad_norm_
    norm = clip(model.parameters(), MAX_NORM)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return all_reduce_mean(total, dims).item(), float(norm)


def train_losses(model_name: str, pcfg: ParallelConfig, dims: ParallelDims, accum: int = 1,
                 reference: bool = False, on_meta: bool = True) -> dict:
    """Losses (global mean) and grad norms of STEPS steps on the fixed global batches, plus model facts."""
    model, opt, scaler = build(model_name, pcfg, dims, on_meta)
    inner = unwrap(model)
    out = {"loss": [], "norm": [], "tied": inner.output.weight is inner.tok_embeddings.weight,
           "names": sorted(n for n, _ in inner.named_parameters()),
           "n_params": sum(1 for _ in model.parameters()), "logits_dtype": None}
    for step in range(STEPS):
        loss, norm = train_step(model, opt, scaler, step, dims, pcfg, accum, reference, out)
        out["loss"].append(loss)
        out["norm"].append(norm)
    return out


def dcp_save(dims: ParallelDims, run_dir: Path) -> dict:
    """FSDP2 on 2 ranks: 2 steps, save a sharded training checkpoint (ember.train.state) and export the
    plain checkpoint; then one more step, whose loss a 1-process resume must reproduce."""
    from ember.train.state import export_final, full_state_dict, save_train_state

    pcfg = ParallelConfig(data_parallel="fsdp")
    model, opt, _ = build("tiny", pcfg, dims)
    for step in range(2):
        train_step(model, opt, None, step, dims, pcfg)
    ckpt = save_train_state(run_dir, 2, model, opt, dp_size=dims.dp_size, model_config=model.cfg.to_dict())
    full = full_state_dict(model)
    export_final(model, run_dir / "export")
    if dims.is_main:
        torch.save(full, run_dir / "full.pt")
    loss, _ = train_step(model, opt, None, 2, dims, pcfg)
    return {"ckpt": str(ckpt), "next_loss": loss}


def worker(case_names: list[str], out_path: str) -> None:
    dims = init_distributed(device="cpu", timeout_s=60)
    results = {}
    for name in case_names:
        if name == "dcp":
            results[name] = dcp_save(dims, Path(out_path).parent / "dcp_run")
            continue
        model_name, kw, accum = ALL[name]
        results[name] = train_losses(model_name, ParallelConfig(**kw), dims, accum=accum,
                                     on_meta=not name.endswith("-pre"))
    if dims.is_main:
        Path(out_path).write_text(json.dumps(results))
    destroy_distributed()


def launch(case_names: list[str], tmp_path: Path, timeout: int = 120) -> dict:
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, ",".join(case_names), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return {**json.loads(out.read_text()), "_dir": str(tmp_path)}


def reference(model_name: str) -> dict:
    return train_losses(model_name, ParallelConfig(), ParallelDims(), reference=True)


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    """One torchrun launch (2 processes) running every default case."""
    return launch(list(CASES) + list(LOW_PRECISION) + ["dcp"], tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def refs() -> dict:
    return {name: reference(name) for name in ("tiny", "tiny-llama")}


@pytest.mark.timeout(180)
def test_ddp_fsdp_accum_ac_equal_single_process(launched, refs):
    for case, (model_name, _, _) in CASES.items():
        ref, res = refs[model_name], launched[case]
        assert res["loss"] == pytest.approx(ref["loss"], abs=1e-5), case
        assert res["norm"] == pytest.approx(ref["norm"], rel=1e-4), case
        assert res["names"] == ref["names"], case  # AC / FSDP / DDP keep parameter names
        assert res["tied"] == ref["tied"] and res["n_params"] == ref["n_params"], case
    assert refs["tiny"]["norm"][0] > MAX_NORM  # clipping was active
    assert launched["fsdp"]["tied"]  # tied embeddings survive fully_shard on meta + materialize


@pytest.mark.timeout(180)
def test_low_precision_close_to_fp32(launched, refs):
    ref = refs["tiny"]
    for case in LOW_PRECISION:
        assert launched[case]["loss"] == pytest.approx(ref["loss"], abs=2e-2), case
        assert launched[case]["loss"] != ref["loss"], case  # really ran in low precision
    assert launched["fsdp-bf16"]["logits_dtype"] == "torch.bfloat16"  # MixedPrecisionPolicy, no autocast
    assert launched["fsdp-fp16"]["logits_dtype"] == "torch.float16"  # autocast + GradScaler


@pytest.mark.timeout(180)
def test_dcp_sharded_checkpoint_loads_into_one_process_and_exports(launched, tmp_path):
    """2 -> 1 reshard: the FSDP2 checkpoint (ember.train.state, DCP) loads into a plain model and
    optimizer exactly; training continues with the 2-process run's next loss; both exports (from the
    live sharded model and from the checkpoint) give the same plain safetensors checkpoint."""
    from ember.io.checkpoint import load_checkpoint
    from ember.train.state import export_to_safetensors, load_train_state

    run_dir = Path(launched["_dir"]) / "dcp_run"
    full = torch.load(run_dir / "full.pt", weights_only=True)  # rank 0's gathered weights at step 2
    dims, pcfg = ParallelDims(), ParallelConfig()
    model, opt, _ = build("tiny", pcfg, dims)  # fresh weights, overwritten by the load
    load_train_state(launched["dcp"]["ckpt"], model, opt, dp_size=1, restore_rng=False)
    for name, t in model.state_dict().items():
        assert torch.equal(t, full[name]), name
    assert model.output.weight is model.tok_embeddings.weight
    assert len(opt.state) == len(list(model.parameters())) and all(s["step"] == 2 for s in opt.state.values())
    loss, _ = train_step(model, opt, None, 2, dims, pcfg)
    assert loss == pytest.approx(launched["dcp"]["next_loss"], abs=1e-5)

    exported = export_to_safetensors(launched["dcp"]["ckpt"], tmp_path / "export")
    for ckpt_dir in (exported, run_dir / "export"):
        plain, _ = load_checkpoint(ckpt_dir)
        for name, t in plain.state_dict().items():
            assert torch.equal(t, full[name]), (ckpt_dir, name)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EMBER_TEST_COMPILE"),
                    reason="compiling takes minutes on 2 CPU cores; set EMBER_TEST_COMPILE=1")
@pytest.mark.timeout(600)
def test_compile_with_ddp_and_fsdp(tmp_path, refs):
    got = launch(list(COMPILE), tmp_path, timeout=580)
    for case in COMPILE:
        assert got[case]["loss"] == pytest.approx(refs["tiny"]["loss"], abs=1e-5), case
        assert got[case]["names"] == refs["tiny"]["names"], case


if __name__ == "__main__":
    worker(sys.argv[1].split(","), sys.argv[2])
