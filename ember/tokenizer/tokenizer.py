"""`Tokenizer`: one class over every tokenizer ember reads, with one saved-directory format.

    tok = Tokenizer.load("runs/tok")          # a saved dir, a HF tokenizer dir, GPT-2 files or a .tiktoken
    ids = tok.encode("Hello world")           # special-token strings in text stay plain text
    tok.encode("a<|endoftext|>b", allowed_special="all")   # ... unless allowed
    tok.decode(ids); tok.encode_batch(texts)  # batch: parallel (Rust threads)

What `load` accepts (detected by the files present and their contents, never by folder name):
  * a directory with `tokenizer.json` (ember's own, or a Hugging Face model's), with optional
    `ember_tokenizer.json` (ember's metadata) and `tokenizer_config.json` (eos/pad, chat_template);
  * a directory or file with GPT-2's `vocab.json` + `merges.txt` (or `encoder.json` + `vocab.bpe`);
  * a `.tiktoken` rank file (or a directory holding one, optionally with `ember_tokenizer.json`).
Rank files encode through `tiktoken` itself, so their ids are exactly tiktoken's.

A saved directory holds `tokenizer.json` (or `tokenizer.tiktoken`), `tokenizer_config.json` (so that
`transformers.AutoTokenizer.from_pretrained(dir)` works offline) and `ember_tokenizer.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ember.errors import EmberError
from ember.fileio import atomic_dir
from ember.tokenizer import chat
from ember.tokenizer.backends import AllowedSpecial, HFBackend, TiktokenBackend
from ember.tokenizer.formats import EMBER_META, META_VERSION  # noqa: F401  (re-exported)

EOS, PAD = "<|endoftext|>", "<|pad|>"
# eos candidates, in order, for tokenizers without metadata
_EOS_GUESSES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class Tokenizer:
    """Encode/decode text, with eos/pad ids and a chat template. Build with `load` or `train_bpe`."""

    def __init__(self, backend: HFBackend | TiktokenBackend, meta: dict | None = None):
        self.backend = backend
        meta = dict(meta or {})
        meta.setdefault("eos_token", next((t for t in _EOS_GUESSES if backend.token_to_id(t) is not None), None))
        meta.setdefault("pad_token", PAD if backend.token_to_id(PAD) is not None else None)
        meta.setdefault("bos_token", None)
        meta.setdefault("chat_template", "chatml")
        meta.setdefault("model_max_length", None)
        self.meta = meta

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def _id_of(self, field: str) -> int | None:
        token = self.meta.get(field)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int:
        i = self._id_of("eos_token")
        if i is None:
            raise EmberError(
                f"tokenizer: no end-of-text token (eos_token={self.meta.get('eos_token')!r} is not in the vocab). "
                f"HINT: set eos_token in {EMBER_META}"
            )
        return i

    @property
    def pad_id(self) -> int | None:
        return self._id_of("pad_token")

    @property
    def fill_id(self) -> int:
        """The id batches are padded with: the pad token, else EOS (padding is always masked by position,
        so which id fills it never matters to the loss)."""
        return self.pad_id if self.pad_id is not None else self.eos_id

    @property
    def bos_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.backend.specials)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # ------------------------------------------------------------------ encode / decode
    def _frame(self, ids: list[int], add_special: bool) -> list[int]:
        if not add_special:
            return ids
        bos = self.bos_id
        return ([bos] if bos is not None else []) + ids + [self.eos_id]

    def encode(self, text: str, add_special: bool = False, allowed_special: AllowedSpecial = None) -> list[int]:
        """text -> ids. `add_special`: frame as a document, `[bos] + ids + [eos]` (bos only if the
        tokenizer has one). `allowed_special`: "all" or a set of special-token strings to recognise in
        the text; by default they are encoded as plain text (like tiktoken's `encode_ordinary`)."""
        if not isinstance(text, str):
            raise EmberError(f"tokenizer.encode: expected a str, got {type(text).__name__}")
        return self._frame(self.backend.encode(text, allowed_special), add_special)

    def encode_batch(self, texts: list[str], add_special: bool = False, allowed_special: AllowedSpecial = None) -> list[list[int]]:
        """Many texts at once, in parallel threads (same ids as `encode` on each)."""
        texts = list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise EmberError(f"tokenizer.encode_batch: texts[{bad}] is a {type(texts[bad]).__name__}, expected str")
        return [self._frame(ids, add_special) for ids in self.backend.encode_batch(texts, allowed_special)]

    def decode(self, ids) -> str:
        """ids -> text (special tokens kept; invalid UTF-8 byte runs become U+FFFD)."""
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = next((i for i in ids if i < 0 or i >= n), None)
        if bad is not None:
            raise EmberError(f"tokenizer.decode: token id {bad} is out of range, expected 0 <= id < vocab_size={n}")
        try:
            return self.backend.decode(ids)
        except KeyError as e:  # a hole in a tiktoken vocabulary
            raise EmberError(f"tokenizer.decode: token id {e.args[0]} is not in the vocabulary") from None

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Messages [{"role", "content"}] -> prompt text (ChatML, or the tokenizer's Jinja template)."""
        template = self.meta.get("chat_template") or "chatml"
        if template == "chatml":
            return chat.render_chatml(messages, add_generation_prompt)
        names = {k: self.meta.get(k) or "" for k in ("bos_token", "eos_token", "pad_token")}
        return chat.render_jinja(template, messages, add_generation_prompt, **names)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Messages -> prompt ids, with the template's control tokens as special ids and every message's
        content encoded as plain text: a user who types `<|im_end|>` gets those characters, never the
        token (`chat.split_rendered` says how the content is located in any template's output)."""
        pieces = chat.split_rendered(lambda msgs: self.apply_chat_template(msgs, add_generation_prompt), messages)
        ids: list[int] = []
        for text, is_content in pieces:
            if text:
                ids += self.backend.encode(text, None if is_content else "all")
        return ids

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer to `directory` atomically (replacing what was there)."""
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            self.backend.save(tmp)
            meta = {"format": "ember-tokenizer", "version": META_VERSION, "kind": self.backend.kind, **self.meta}
            if self.backend.kind == "tiktoken":
                meta.update(pattern=self.backend.pattern, special_tokens=self.backend.specials, ranks_file="tokenizer.tiktoken")
            else:
                (tmp / "tokenizer_config.json").write_text(json.dumps(self._hf_config(), indent=2, ensure_ascii=False) + "\n")
            (tmp / EMBER_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        return directory

    def export_vocab_merges(self, directory: str | Path) -> tuple[Path, Path]:
        """Write GPT-2-style vocab.json + merges.txt (for tiktoken and other BPE readers)."""
        from tokenizers import models

        model = getattr(self.backend, "tok", None) and self.backend.tok.model
        if not isinstance(model, models.BPE):
            raise EmberError("export_vocab_merges: only a HF byte-level BPE tokenizer has vocab.json + merges.txt")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model.save(str(directory))
        return directory / "vocab.json", directory / "merges.txt"

    def _hf_config(self) -> dict:
        """tokenizer_config.json for transformers (PreTrainedTokenizerFast over tokenizer.json)."""
        template = self.meta.get("chat_template") or "chatml"
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.meta.get("bos_token"),
            "eos_token": self.meta.get("eos_token"),
            "pad_token": self.meta.get("pad_token"),
            "unk_token": None,
            "model_max_length": self.meta.get("model_max_length") or 1_000_000_000,
            "clean_up_tokenization_spaces": False,
            "add_prefix_space": False,
            "chat_template": chat.CHATML_JINJA if template == "chatml" else template,
        }

    @classmethod
    def load(cls, path: str | Path, engine: str = "auto") -> "Tokenizer":
        """Load from a directory or file; the format is detected from the files and their contents.
        `engine`: "auto" encodes through tiktoken wherever that gives the same ids (rank files, plain
        byte-level BPE tokenizer.json), else through HF tokenizers; "hf" forces HF tokenizers (GPT-2
        files then save as tokenizer.json); "tiktoken" fails if tiktoken cannot encode this file."""
        from ember.tokenizer import loaders

        backend, meta = loaders.load(Path(path), engine)
        return cls(backend, meta)

    @property
    def engine(self) -> str:
        """Which library encodes: "tiktoken" or "hf" (HF tokenizers)."""
        return self.backend.engine

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.backend.kind}, engine={self.engine}, vocab_size={self.vocab_size}, eos={self.meta.get('eos_token')!r})"


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Copy a saved tokenizer directory (only its tokenizer files) to `dst`, atomically."""
    src, dst = Path(src), Path(dst)
    names = ["tokenizer.json", "tokenizer.tiktoken", "tokenizer_config.json", EMBER_META, "special_tokens_map.json"]
    with atomic_dir(dst) as tmp:
        for name in names:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return dst
