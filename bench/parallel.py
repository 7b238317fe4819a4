"""Training layouts on this CPU: tokens/s, and measured memory per rank beside `ember plan`'s prediction.

    .venv/bin/python bench/parallel.py                  # 1, 2 and 4 gloo processes, a 4 x 256 Llama, T 128
    .venv/bin/python bench/parallel.py --steps 6 --layouts 1,dp2,tp2

Each layout runs under torchrun (one thread per process), builds the model with ember's own
`build_model` and trains it with the one `Trainer` on the same random global batches. Per rank it
records the local bytes of parameters, gradients and AdamW state (in an optimizer step pre-hook: both
exist then) and what one forward leaves for backward (`ember.parallel.memory.SavedActivations`; not
under PP, where the schedule interleaves microbatches). Beside each number: what `ember plan`'s
arithmetic (parallel/plan.py) predicts for that rank, and the ratio. "plan tok/s" is the plan's
step-time estimate for one process per core at this machine's single-thread fp32 GEMM peak (measured
here), at the efficiency the 1-process layout reached (its own row is exact by construction); layouts
with more processes than cores time-share them, so their measured tokens/s falls below the plan's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ember.models import preset  # noqa: E402
from ember.parallel import ParallelConfig  # noqa: E402

MODEL = dict(n_layer=4, n_embd=256, n_head=8, n_kv_head=4, vocab_size=4096, ffn_hidden=688, block_size=128)
LAYOUTS = {  # name -> (processes, ParallelConfig kwargs)
    "1": (1, {}),
    "dp2": (2, {}),  # FSDP2 over 2
    "ddp2": (2, {"data_parallel": "ddp"}),
    "tp2": (2, {"tp": 2}),
    "tp2-nosp": (2, {"tp": 2, "sequence_parallel": False}),
    "pp2": (2, {"pp": 2}),
    "dp2xtp2": (4, {"tp": 2}),
    "pp2xtp2": (4, {"pp": 2, "tp": 2}),
    "hsdp2x2": (4, {"dp_replicate": 2, "dp_shard": 2}),
}


def model_config():
    return preset("tiny-llama", **MODEL)


def worker(names: list[str], batch: int, seq: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from ember.parallel import destroy_distributed, init_distributed, unwrap
    from ember.parallel.memory import SavedActivations, local_state_bytes
    from ember.train.loop import TrainConfig, Trainer
    from ember.train.loss import LMLoss
    from ember.train.optim import build_optimizer, build_scheduler
    from ember.train.run import build_model

    mcfg = model_config()
    results = {}
    for name in names:
        pcfg = ParallelConfig(**LAYOUTS[name][1])
        dims = init_distributed(device="cpu", timeout_s=300, parallel=pcfg)
        tc = TrainConfig(max_steps=steps, batch_size=batch // dims.dp_size, lr=1e-3, warmup_steps=0,
                         schedule="constant", grad_clip=1.0, log_every=10 ** 9, eval_every=0)
        loss_fn = LMLoss()
        model = build_model(mcfg, dims, pcfg, seed=0, loss_parallel=loss_fn.loss_parallel)
        opt = build_optimizer(model, tc.lr, tc.weight_decay, tc.betas, tc.eps)
        parts = list(model.parts) if dims.pp > 1 else [unwrap(model)]
        params = [p for part in parts for p in part.parameters()]
        state: dict = {}
        calls = [0]

        def record(*_):
            calls[0] += 1
            if calls[0] == 2:
                state.update(local_state_bytes(params, opt))

        opt.register_step_pre_hook(record)

        class Batches:
            i = 0

            def next_batch(self):
                g = torch.Generator().manual_seed(self.i)
                self.i += 1
                data = torch.randint(0, mcfg.vocab_size, (batch, seq + 1), generator=g)
                rows = batch // dims.dp_size
                d = data[dims.dp_rank * rows:(dims.dp_rank + 1) * rows]
                return d[:, :-1].clone(), d[:, 1:].clone()

            def state_dict(self):
                return {"i": self.i}

            def load_state_dict(self, sd):
                self.i = sd["i"]

        tr = Trainer(model, opt, build_scheduler(opt, tc), Batches(), None, tc, dims, loss_fn=loss_fn, parallel=pcfg)
        tr.train_step()  # warm-up
        if dims.distributed:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        if dims.distributed:
            dist.barrier()
        elapsed = time.perf_counter() - t0
        saved = None
        if dims.pp == 1:
            x, y = Batches().next_batch()
            with tr._loss_parallel(), SavedActivations(model) as s:
                loss_fn(model, (x, y))
            saved = s.bytes
        mine = {"state": state, "saved": saved, "pp_rank": dims.pp_rank, "shard_index": dims.dp_rank % dims.dp_shard,
                "degrees": [dims.dp_replicate, dims.dp_shard, dims.tp, dims.pp]}
        everyone = [mine]
        if dims.distributed:
            everyone = [None] * dims.world_size
            dist.all_gather_object(everyone, mine)
        results[name] = {"ranks": everyone, "tokens_per_s": steps * batch * seq / elapsed,
                         "local_batch": batch // dims.dp_size}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(results))
    destroy_distributed()


def launch(names: list[str], nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               __file__, "--worker", ",".join(names), "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"torchrun failed for {names}:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def single_thread_peak() -> float:
    torch.set_num_threads(1)
    from bench.common import measure_gemm_peak_flops

    return measure_gemm_peak_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--worker")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker.split(","), args.batch, args.seq, args.steps, args.out)

    from rich.console import Console
    from rich.table import Table

    from bench.common import machine_line
    from ember.parallel.plan import HARDWARE, Layout, activation_bytes, evaluate, rank_state_bytes

    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"--layouts: unknown {unknown}; expected some of {', '.join(LAYOUTS)}")
    mcfg = model_config()
    peak = single_thread_peak()
    results = {}
    for nproc in sorted({LAYOUTS[n][0] for n in names}):
        results.update(launch([n for n in names if LAYOUTS[n][0] == nproc], nproc, args))
    # the efficiency the 1-process run reached calibrates the plan's time model for the other layouts
    eff = HARDWARE["cpu"].mfu
    if "1" in results:
        eff = min(1.0, results["1"]["tokens_per_s"] * mcfg.flops_per_token(args.seq) / peak)
    cpu = dataclasses.replace(HARDWARE["cpu"], peak_flops={"fp32": peak}, mfu=eff)
    table = Table(title=f"bench/parallel.py: Llama {mcfg.n_layer} x {mcfg.n_embd}, vocab {mcfg.vocab_size}, "
                        f"global batch {args.batch} x {args.seq}, {args.steps} steps, fp32")
    for col in ("layout", "procs", "tok/s", "plan tok/s", "rank", "state MiB", "plan", "ratio",
                "activ MiB", "plan", "ratio"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    rows = []
    for name in names:
        res = results[name]
        nproc, kw = LAYOUTS[name]
        pcfg = ParallelConfig(**kw)
        dpr, dps, tp, pp = res["ranks"][0]["degrees"]
        lay = Layout(dpr, dps, tp, pp, microbatch=res["local_batch"], data_parallel=pcfg.data_parallel,
                     pp_schedule=pcfg.pp_schedule, sequence_parallel=pcfg.sequence_parallel)
        est = evaluate(mcfg, dataclasses.replace(lay, microbatch=max(1, res["local_batch"] // max(1, pp))),
                       cpu, args.seq, args.batch)
        for rank, r in enumerate(res["ranks"]):
            st = sum(r["state"].values())
            plan_st = sum(rank_state_bytes(mcfg, lay, r["pp_rank"], r["shard_index"]).values())
            act = r["saved"]
            plan_act = activation_bytes(mcfg, lay, res["local_batch"], args.seq) if act is not None else None
            rows.append({"layout": name, "procs": nproc, "rank": rank, "tokens_per_s": res["tokens_per_s"],
                         "plan_tokens_per_s": est.tokens_per_s, "state_bytes": st, "plan_state_bytes": plan_st,
                         "activation_bytes": act, "plan_activation_bytes": plan_act})
            mib = 2 ** 20
            table.add_row(name if rank == 0 else "", str(nproc) if rank == 0 else "",
                          f"{res['tokens_per_s']:,.0f}" if rank == 0 else "",
                          f"{est.tokens_per_s:,.0f}" if rank == 0 else "", str(rank),
                          f"{st / mib:.2f}", f"{plan_st / mib:.2f}", f"{plan_st / st:.3f}",
                          "-" if act is None else f"{act / mib:.2f}",
                          "-" if act is None else f"{plan_act / mib:.2f}",
                          "-" if act is None else f"{plan_act / act:.3f}")
    console = Console()
    console.width = max(console.width, 140)
    console.print(table)
    console.print(f"{machine_line()}; single-thread fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s; plan efficiency "
                  f"{cpu.mfu:.2f} (" + ("from the 1-process run" if "1" in results else "default") + f"); {os.cpu_count()} cores", highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
