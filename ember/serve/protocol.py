"""OpenAI request bodies -> engine requests, and engine results -> OpenAI response bodies.

Fields follow OpenAI's completions and chat completions APIs, with vLLM's extras (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, prompt_logprobs). A field with a wrong type or value
is a `BadRequest` naming the field and what was expected (HTTP 400); fields that ember does not
implement (suffix, logit_bias, tools, response_format other than text) are refused the same way
rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ember.infer.engine import Request, RequestParams, TokenLogprob


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, kind: str, status: int, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass
class Limits:
    context: int
    """The model's context window (prompt + completion)."""
    max_prompt_tokens: int
    max_tokens: int
    max_n: int = 8


_NUM = (int, float)


def get_field(body: dict, name: str, kinds: tuple, default: Any = None, *, nullable: bool = True) -> Any:
    if name not in body or (body[name] is None and nullable):
        return default
    v = body[name]
    if isinstance(v, bool) and bool not in kinds:
        raise BadRequest(f"'{name}' must be {_kind_names(kinds)}, got a boolean.", name)
    if not isinstance(v, kinds):
        raise BadRequest(f"'{name}' must be {_kind_names(kinds)}, got {type(v).__name__}.", name)
    return v


def _kind_names(kinds: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "a list",
             dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


UNSUPPORTED = ("suffix", "logit_bias", "tools", "functions", "tool_choice", "function_call")


def sampling_params(body: dict, limits: Limits, chat: bool, prompt_len: int) -> RequestParams:
    """The engine's RequestParams from a request body (both endpoints). Without max_tokens, completions
    generate 16 tokens (OpenAI's default) and chat what the context window leaves."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, {}, [], ""):
            raise BadRequest(f"'{name}' is not supported by this server.", name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise BadRequest("'response_format': only {\"type\": \"text\"} is supported.", "response_format")
    max_tokens = get_field(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                      (int,), None)
    if max_tokens is None:
        max_tokens = 16 if not chat else max(0, min(limits.max_tokens, limits.context - prompt_len))
    n = get_field(body, "n", (int,), 1)
    best_of = get_field(body, "best_of", (int,), None)
    if best_of is not None and best_of != n:
        raise BadRequest("'best_of' different from 'n' is not supported.", "best_of")
    if not 1 <= n <= limits.max_n:
        raise BadRequest(f"'n' must be between 1 and {limits.max_n}, got {n}.", "n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 16:
        raise BadRequest("'stop' must be a string or a list of at most 16 strings.", "stop")
    stop_ids = get_field(body, "stop_token_ids", (list,), [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise BadRequest("'stop_token_ids' must be a list of integers.", "stop_token_ids")
    top_k = get_field(body, "top_k", (int,), None)
    if top_k is not None and top_k < 0:  # vLLM: -1 (or 0) = off
        if top_k != -1:
            raise BadRequest(f"'top_k' must be -1 (off) or >= 0, got {top_k}.", "top_k")
        top_k = None
    if chat:
        want = get_field(body, "logprobs", (bool,), False)
        top = get_field(body, "top_logprobs", (int,), None)
        if top is not None and not want:
            raise BadRequest("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = get_field(body, "logprobs", (int,), None)
    echo = bool(get_field(body, "echo", (bool,), False)) if not chat else False
    prompt_logprobs = get_field(body, "prompt_logprobs", (int,), None)
    if echo and logprobs is not None:
        prompt_logprobs = logprobs
    params = RequestParams(
        max_tokens=max_tokens,
        temperature=float(get_field(body, "temperature", _NUM, 1.0)),
        top_k=top_k or None,
        top_p=float(get_field(body, "top_p", _NUM, 1.0)),
        min_p=float(get_field(body, "min_p", _NUM, 0.0)),
        repetition_penalty=float(get_field(body, "repetition_penalty", _NUM, 1.0)),
        presence_penalty=float(get_field(body, "presence_penalty", _NUM, 0.0)),
        frequency_penalty=float(get_field(body, "frequency_penalty", _NUM, 0.0)),
        seed=get_field(body, "seed", (int,), None),
        n=n, stop=tuple(stop), stop_token_ids=tuple(stop_ids),
        ignore_eos=bool(get_field(body, "ignore_eos", (bool,), False)),
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    if not 0 <= max_tokens <= limits.max_tokens:
        raise BadRequest(f"'max_tokens' must be between 0 and {limits.max_tokens}, got {max_tokens}.", "max_tokens")
    if prompt_len > limits.max_prompt_tokens:
        raise BadRequest(f"the prompt is {prompt_len} tokens, more than this server's limit of "
                         f"{limits.max_prompt_tokens}.", "messages" if chat else "prompt")
    if prompt_len + max_tokens > limits.context:
        raise BadRequest(f"this model's context is {limits.context} tokens; the prompt ({prompt_len} tokens) + "
                         f"max_tokens ({max_tokens}) exceeds it. Shorten the prompt or lower max_tokens.",
                         "max_tokens")
    try:
        params.validate()
    except Exception as e:  # EmberError from validate: "request: top_p=... is invalid, expected ..."
        msg = str(e).removeprefix("request: ").removeprefix("sampling: ")
        raise BadRequest(msg, msg.split("=")[0] if "=" in msg else None) from None
    return params


def completion_prompts(body: dict, tok) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    if "prompt" not in body:
        raise BadRequest("'prompt' is required.", "prompt")
    p = body["prompt"]
    if isinstance(p, str):
        items: list = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        items = p
    else:
        raise BadRequest("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists (not empty).", "prompt")
    out = []
    for i, x in enumerate(items):
        if isinstance(x, str):
            ids = tok.encode(x) if x else [tok.eos_id]
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in x) and x:
            ids = list(x)
        else:
            raise BadRequest(f"'prompt[{i}]' must be a string or a non-empty list of token ids.", "prompt")
        out.append(ids)
    return out


def chat_prompt(body: dict, tok) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects.", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"'messages[{i}]' must be an object with a 'role' string.", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise BadRequest(f"'messages[{i}].content': only text parts are supported.", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest(f"'messages[{i}].content' must be a string.", "messages")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise BadRequest(f"'messages[{i}].role' {m['role']!r} is not one of system, user, assistant.",
                             "messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    try:
        return tok.encode_chat(clean, add_generation_prompt=True)
    except Exception as e:  # a template that refuses the roles (e.g. no system turn)
        raise BadRequest(f"'messages': the chat template refused them: {e}", "messages") from None


# ---------------------------------------------------------------------------------- responses
def usage(reqs: list[Request]) -> dict:
    prompt = sum(len(r.prompt) for r in reqs)
    completion = sum(len(s.output) for r in reqs for s in r.seqs)
    cached = sum(r.cached_tokens for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _piece(tok, i: int) -> str:
    return tok.decode([i])


def completion_logprobs(tok, lps: list[Optional[TokenLogprob]], ids: list[int], offset0: int = 0) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset0
    for i, lp in zip(ids, lps):
        piece = _piece(tok, i)
        tokens.append(piece)
        offsets.append(pos)
        pos += len(piece)
        token_lps.append(None if lp is None else lp.logprob)
        if lp is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t, v in lp.top or [(i, lp.logprob)]:  # highest first; tokens that decode alike keep the highest
            top.setdefault(_piece(tok, t), v)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok, lps: list[TokenLogprob]) -> dict:
    def entry(t: int, v: float) -> dict:
        s = _piece(tok, t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}
