"""The decoder Transformer (GPT-2 and Llama styles from one ModelConfig).

    tokens (B, T) ─ tok_embeddings (+ pos_embeddings) ─ layers["0"] … layers[str(L-1)] ─ norm ─ output ─ logits (B, T, V)

`forward` returns logits; losses live in ember/train/loss.py. Blocks sit in an `nn.ModuleDict` keyed
by str(i) so a pipeline stage can delete the ones it does not own; `tok_embeddings`, `norm` and
`output` may be set to None and then pass activations through (torchtitan's convention).

Build large models on the meta device, parallelize, then `to_empty()` and `init_weights()`:

    with torch.device("meta"):
        model = Transformer(preset("llama-3-8b"))
    model.to_empty(device="cuda"); model.init_weights()
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ember.models.config import ModelConfig
from ember.models.layers import Block, make_norm, rope_cache


def attention_mask(mode: str, T: int, S: int, device: torch.device, input_pos: Optional[torch.Tensor] = None,
                   prefix_len: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], bool]:
    """The boolean mask (True = may attend) for one mask mode, and whether SDPA's is_causal suffices.

    Without a cache the query at position t sees keys 0..T-1 subject to the mode; with a cache
    (`input_pos`: (T,) slots the queries occupy) keys are the S cache slots, and slots after the
    query's own are never visible (they are empty).
    Returns (mask of shape (1 or B, 1, T, S) or None, is_causal).
    """
    q = (input_pos if input_pos is not None else torch.arange(T, device=device)).view(-1, 1)  # (T, 1)
    k = torch.arange(S, device=device).view(1, -1)  # (1, S)
    if mode == "prefix":
        if prefix_len is None:
            raise ValueError("mask='prefix' needs prefix_len: a (B,) tensor of prefix lengths")
        visible = (k <= q) | (k < prefix_len.view(-1, 1, 1).to(device))  # (B, T, S)
        return visible.unsqueeze(1), False
    if mode == "bidirectional":
        if input_pos is None:
            return None, False
        return (k <= q.max()).view(1, 1, 1, S).expand(1, 1, T, S), False
    if input_pos is None and T == S:
        return None, True
    return (k <= q).view(1, 1, T, S), False


class Transformer(nn.Module):
    """Decoder Transformer. `n_out` sizes the output head: None = the vocabulary (a language model; tied
    to the embedding when cfg.tie_embeddings), else n_out outputs per position (a classifier's classes,
    1 for a reward model), never tied."""

    def __init__(self, cfg: ModelConfig, n_out: Optional[int] = None):
        super().__init__()
        self.cfg, self.n_out = cfg, n_out
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embeddings: Optional[nn.Embedding] = (
            nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.norm: Optional[nn.Module] = make_norm(cfg)
        self.output: Optional[nn.Linear] = nn.Linear(cfg.n_embd, n_out or cfg.vocab_size, bias=False)
        if cfg.pos_emb == "rope":
            self.register_buffer("rope", rope_cache(cfg), persistent=False)  # (block_size, D)
        else:
            self.rope = None
        self.tie_weights()

    def set_head(self, n_out: int, std: Optional[float] = None, generator: Optional[torch.Generator] = None) -> None:
        """Replace the output head by a fresh, untied Linear(n_embd, n_out) ~ N(0, std) (a classifier's or a
        reward model's head on a pretrained body)."""
        w = self.tok_embeddings.weight if self.tok_embeddings is not None else next(self.parameters())
        head = nn.Linear(self.cfg.n_embd, n_out, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            head.weight.normal_(0.0, self.cfg.init_std if std is None else std, generator=generator)
        self.output, self.n_out = head, n_out

    # ------------------------------------------------------------------------------------- init
    def tie_weights(self) -> None:
        """Share the embedding with the head (again: `to_empty()` unties parameters)."""
        if (self.cfg.tie_embeddings and self.n_out is None and isinstance(self.tok_embeddings, nn.Embedding)
                and isinstance(self.output, nn.Linear)):  # (a quantized pair shares its codes instead)
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """GPT-2 init: N(0, init_std); residual output projections N(0, init_std / sqrt(2 L)); norms 1, biases 0."""
        if seed is not None:
            torch.manual_seed(seed)
        cfg = self.cfg
        self.tie_weights()
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                std = resid_std if name.endswith(("attention.wo", "feed_forward.w2")) else cfg.init_std
                nn.init.normal_(mod.weight, 0.0, std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, cfg.init_std)
            elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                mod.reset_parameters()
        self.reset_buffers()

    def reset_buffers(self, device: Optional[torch.device] = None) -> None:
        """Recompute the non-persistent buffers (the fp32 RoPE table) without touching the weights.

        Needed after `to_empty()` or after loading weights with `load_state_dict(assign=True)` into a
        model built on meta. `device` defaults to the buffer's own device, or the parameters' when meta.
        """
        if self.rope is None:
            return
        if device is None:
            device = self.rope.device
            if device.type == "meta":
                device = next((p.device for p in self.parameters() if p.device.type != "meta"), device)
        self.rope = rope_cache(self.cfg, device=device)

    # ---------------------------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, prefix_len: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, V), or hidden states when `output` is None (pipeline stages).

        tokens:     (B, T) token ids, or (B, T, C) activations when `tok_embeddings` is None.
        input_pos:  (T,) KV-cache slots the tokens occupy (decoding with caches set up).
        positions:  (T,) or (B, T) position ids for RoPE / learned positions; default input_pos or 0..T-1.
        prefix_len: (B,) prefix lengths, for mask='prefix'.
        attn_mask:  (B, 1, T, S) bool, AND-ed with the mode's mask (e.g. left-padding in batched decode).
        """
        h = self.hidden_states(tokens, input_pos=input_pos, positions=positions, prefix_len=prefix_len,
                               attn_mask=attn_mask)
        return self.output(h) if self.output is not None else h

    def hidden_states(self, tokens: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None,
                      positions: Optional[torch.Tensor] = None, prefix_len: Optional[torch.Tensor] = None,
                      attn_mask: Optional[torch.Tensor] = None, kv_len: Optional[int] = None) -> torch.Tensor:
        """The final-norm output (B, T, C) that `output` turns into logits; arguments as `forward`.

        kv_len: with caches, attend over the first kv_len cache slots only (a decoder that knows the
        slots after them are empty passes it: the inference engine does, eagerly); None = all slots.

        Losses that fuse the head (train/fused_loss.py) call this and `output.weight` so the
        (B, T, V) logits are never materialised. It bypasses `__call__`, so module hooks of the
        root (DDP, FSDP2 root) do not run: wrapped models use `forward`.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        B, T = h.shape[:2]
        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=h.device)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(positions)
        h = self.drop(h)
        rope = self.rope[positions].unsqueeze(-2) if self.rope is not None else None  # (T, 1, 2D) or (B, T, 1, 2D)
        S = self._key_len(T, input_pos)
        if kv_len is not None and (self.cfg.mask == "prefix" or input_pos is None or S <= T):
            kv_len = None  # the prefix mask needs every slot; without a cache there is nothing to cut
        if kv_len is not None:
            S = kv_len = min(S, kv_len)
        if kv_len is not None and T == 1 and attn_mask is None:
            mask, is_causal = None, False  # one query at the last filled slot sees every filled slot
        else:
            mask, is_causal = attention_mask(self.cfg.mask, T, S, h.device, input_pos, prefix_len)
        if attn_mask is not None:
            attn_mask = attn_mask[..., :S]
            if mask is None and is_causal:  # the extra mask replaces is_causal: spell causality out
                mask = torch.ones(T, S, dtype=torch.bool, device=h.device).tril().view(1, 1, T, S)
            mask, is_causal = (attn_mask if mask is None else mask & attn_mask), False
        for layer in self.layers.values():
            h = layer(h, rope, mask, is_causal, input_pos, kv_len)
        if self.norm is not None:
            h = self.norm(h)
        return h

    def _key_len(self, T: int, input_pos: Optional[torch.Tensor]) -> int:
        """Keys each query can see: T without a cache, else the cache length (its static shape)."""
        if input_pos is None:
            return T
        for layer in self.layers.values():
            if layer.attention.kv_cache is not None:
                return layer.attention.kv_cache.k.shape[2]
        return T

    # ------------------------------------------------------------------------------------ utils
    def num_params(self, embedding: bool = True) -> int:
        """Counted from the parameters (shared ones once); embedding=False leaves out tok/pos embeddings."""
        seen, total = set(), 0
        skip = set()
        if not embedding:
            skip = {id(m.weight) for m in (self.tok_embeddings, self.pos_embeddings) if m is not None}
        for p in self.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def from_state_dict(cfg: ModelConfig, state_dict: dict, device: str | torch.device = "cpu",
                    n_out: Optional[int] = None) -> Transformer:
    """A Transformer that holds `state_dict`'s tensors (assigned, not copied), in eval mode.

    Built on meta (no throw-away init); a tied head takes the embedding; RoPE buffers are computed on `device`.
    `n_out`: the head's size for a classifier / reward model (see Transformer).
    """
    sd = dict(state_dict)
    if cfg.tie_embeddings and n_out is None:
        sd.setdefault("output.weight", sd["tok_embeddings.weight"])
    with torch.device("meta"):
        model = Transformer(cfg, n_out)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    model.reset_buffers(torch.device(device))
    return model.eval()
