"""Serve a checkpoint over an OpenAI-compatible HTTP API (and a chat page at /).

    ember serve --checkpoint runs/smollm2
    ember serve --checkpoint runs/finetune/final --port 8001 --api-key sk-local --engine.max-num-seqs 64
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'

Binds 127.0.0.1 unless --host says otherwise. Keys come from --api-key (repeat it for several) and
from the EMBER_API_KEY environment variable (comma-separated); with none, the API is open, which is
fine on 127.0.0.1 only (a warning says so for any other host). Adapter checkpoints (LoRA, QLoRA: ember
finetune's output) load like any other and are merged into their base for serving. Ctrl-C (SIGINT) or SIGTERM: requests in flight get a few seconds to finish, then are
aborted, and every stream ends cleanly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import tyro

from ember.errors import EmberError
from ember.infer.engine import EngineConfig
from ember.log import log, warn


@dataclass
class Config:
    """Serve a checkpoint over an OpenAI-compatible HTTP API."""

    checkpoint: str = ""
    """Checkpoint directory to serve."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; default the checkpoint's own."""
    served_model_name: Optional[str] = None
    """The model id clients send; default the checkpoint directory's name."""
    host: str = "127.0.0.1"
    """Address to bind (0.0.0.0 exposes the server to the network: set an API key)."""
    port: int = 8000
    api_key: tyro.conf.UseAppendAction[list[str]] = field(default_factory=list)
    """An accepted API key (repeat for several; EMBER_API_KEY adds comma-separated ones)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 above)."""
    max_queue: int = 256
    """Requests that may wait beyond the running batch (429 above)."""
    max_prompt_tokens: Optional[int] = None
    """Longest prompt accepted (default: the model's context)."""
    max_tokens: Optional[int] = None
    """Largest max_tokens accepted (default: the model's context)."""
    max_n: int = 8
    """Largest n (samples per prompt) accepted."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    draft_checkpoint: Optional[str] = None
    """A smaller checkpoint (same tokenizer) that proposes tokens for greedy requests (speculative
    decoding; sets --engine.speculative draft). --engine.speculative ngram needs no second model."""
    device: str = "cpu"
    """Device to run on (cpu, cuda, ...)."""
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """Weights dtype; default the checkpoint's."""
    log_level: str = "warning"
    """uvicorn's log level (info logs every request)."""


def build(cfg: Config):
    """(FastAPI app, runner) for a config: model and tokenizer loaded, engine started."""
    from ember.infer import api
    from ember.infer.engine import Engine
    from ember.peft.lora import merge_lora
    from ember.serve.app import ServerSettings, create_app
    from ember.serve.runner import EngineRunner
    from ember.tokenizer.chat import end_of_turn_ids

    if not cfg.checkpoint:
        raise EmberError("ember serve: --checkpoint DIR is required (a directory from ember pretrain, "
                         "ember finetune or ember convert).")
    model, tok = api.load(cfg.checkpoint, device=cfg.device, dtype=cfg.dtype, tokenizer=cfg.tokenizer)
    merged = merge_lora(model)  # an adapter checkpoint (LoRA, QLoRA) is served merged into its base
    if merged:
        log(f"merged the checkpoint's LoRA adapters into {merged} base weights")
    draft = None
    if cfg.draft_checkpoint:
        draft, _ = api.load(cfg.draft_checkpoint, device=cfg.device, dtype=cfg.dtype, tokenizer=tok)
        cfg.engine.speculative = "draft"
    engine = Engine(model, cfg.engine, tokenizer=tok, eos_ids=end_of_turn_ids(tok), draft_model=draft)
    keys = list(cfg.api_key) + [k.strip() for k in os.environ.get("EMBER_API_KEY", "").split(",") if k.strip()]
    name = cfg.served_model_name or Path(cfg.checkpoint).resolve().name
    settings = ServerSettings(model_name=name, api_keys=keys, max_body_bytes=cfg.max_body_bytes,
                              max_queue=cfg.max_queue, max_prompt_tokens=cfg.max_prompt_tokens,
                              max_tokens=cfg.max_tokens, max_n=cfg.max_n)
    runner = EngineRunner(engine).start()
    return create_app(runner, tok, settings), runner, engine, name, keys


class ServerThread:
    """`ember serve` in a background thread of this process, on 127.0.0.1 and a free port (for tests,
    benchmarks and notebooks): `.url`, `.port`, `.engine`, `.name`; `stop()` ends it cleanly."""

    def __init__(self, cfg: Config, timeout: float = 60.0):
        import socket
        import threading
        import time

        import uvicorn

        self.app, self.runner, self.engine, self.name, self.keys = build(cfg)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="ember-serve", daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                self.stop()
                raise EmberError(f"ember serve: the server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.runner.shutdown()


def check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise EmberError(f"ember serve: cannot listen on {host}:{port} ({e.strerror}). "
                         "HINT: another server holds the port; pick one with --port N.") from None


def main(cfg: Config) -> None:
    import uvicorn

    check_port(cfg.host, cfg.port)
    app, runner, engine, name, keys = build(cfg)
    if not keys and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"serving on {cfg.host} without an API key: anyone who can reach it can use it. "
             "HINT: pass --api-key KEY (or set EMBER_API_KEY).")
    kv = engine.kv_usage()
    log(f"serving '{name}' on http://{cfg.host}:{cfg.port}  (chat page at /, API at /v1, metrics at /metrics)")
    log(f"engine: {kv['blocks_total']} KV blocks of {engine.pool.block_size} tokens "
        f"({engine.kv_bytes / 2**20:.0f} MiB), up to {engine.cfg.max_num_seqs} sequences, "
        f"{engine.cfg.max_num_batched_tokens} tokens per step, prefix caching "
        f"{'on' if engine.cfg.prefix_caching else 'off'}, batch-invariant {'on' if engine.cfg.batch_invariant else 'off'}, "
        f"speculative {engine.cfg.speculative or 'off'}"
        f"; API keys: {len(keys) or 'none'}")
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    finally:
        runner.shutdown()
