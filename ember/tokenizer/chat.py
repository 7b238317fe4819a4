"""Chat templates: messages -> one prompt string.

ember's own tokenizers use ChatML, rendered here in plain Python:

    <|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

A tokenizer converted from a Hugging Face model carries its own Jinja `chat_template` (in
tokenizer_config.json); that is rendered in a sandbox (`ImmutableSandboxedEnvironment`, no file or
attribute access, no code execution), with the same globals transformers gives it.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Callable

from ember.errors import EmberError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# Tokens that end an assistant turn in the common templates (ChatML, Llama 3, Phi, Gemma), and the
# ones that start a new turn (a model that begins one has finished its reply).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
NEW_TURN = ("<|im_start|>", "<|start_header_id|>")


def end_of_turn_ids(tok) -> list[int]:
    """The ids of the tokenizer's end-of-turn tokens and its EOS (the ids a chat reply stops at)."""
    ids = {tok.token_to_id(t) for t in END_OF_TURN}
    try:
        ids.add(tok.eos_id)
    except EmberError:
        pass
    return sorted(i for i in ids if i is not None)

# The same template, as Jinja, written into tokenizer_config.json for transformers.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise EmberError(f"chat messages: expected a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise EmberError(f"chat messages[{i}]: expected a dict with string 'role' and 'content', got {m!r}")


def render_chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    check_messages(messages)
    out = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def _raise(message: str) -> None:
    raise EmberError(f"chat template: {message}")


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - jinja2 comes with transformers
        raise EmberError("this tokenizer has a Jinja chat_template, which needs jinja2. HINT: pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise EmberError(f"chat_template: not a valid Jinja template ({e})") from None


def render_jinja(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """Render a Hugging Face-style Jinja chat template (variables: bos_token, eos_token, ...)."""
    check_messages(messages)
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except EmberError:
        raise
    except Exception as e:  # jinja2 errors, sandbox violations
        raise EmberError(f"chat_template: rendering failed: {type(e).__name__}: {e}") from None


def _sentinel(i: int) -> str:
    return f"\x00ember-content-{i}\x00"  # NUL never occurs in a template or in tokenizer specials


def split_rendered(render: Callable[[list[dict]], str], messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_message_content) pieces, for any template.

    The template is rendered with each content replaced by a sentinel; the text between sentinels is
    the template's own, the only text allowed to hold control tokens. Each sentinel stands for its
    content as the template emitted it: as given, or stripped (templates that `| trim`), checked
    against a rendering with the real contents; as a last resort the contents are located by
    matching that rendering (sentinels as wildcards).
    """
    check_messages(messages)
    real = render(messages)
    marked = render([{**m, "content": _sentinel(i)} for i, m in enumerate(messages)])
    parts = re.split("(\x00ember-content-\\d+\x00)", marked)
    index = [int(p.strip("\x00").rsplit("-", 1)[1]) for p in parts[1::2]]
    raw = [messages[i]["content"] for i in index]
    for contents in (raw, [c.strip() for c in raw]):
        if "".join(c if k % 2 else p for k, (p, c) in enumerate(zip(parts, _interleave(contents, len(parts))))) == real:
            break
    else:
        pattern = "".join("(.*?)" if k % 2 else re.escape(p) for k, p in enumerate(parts))
        found = re.fullmatch(pattern, real, flags=re.DOTALL)
        contents = list(found.groups()) if found is not None else raw
    return [(c, True) if k % 2 else (p, False) for k, (p, c) in enumerate(zip(parts, _interleave(contents, len(parts))))]


def _interleave(contents: list[str], n: int) -> list[str]:
    """contents aligned with re.split's output: position 2j+1 holds contents[j]."""
    out = [""] * n
    for j, c in enumerate(contents):
        out[2 * j + 1] = c
    return out
