"""`ember serve` end to end: a real uvicorn server on 127.0.0.1 (a free port), used through the `openai`
client and raw HTTP. References: `ember.generate` greedy text on the same checkpoint (one by one), the
full forward's log-softmax, and the server's own non-streamed answers."""

import http.client
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from ember.infer import api  # noqa: E402
from ember.infer.engine import EngineConfig  # noqa: E402
from ember.io.checkpoint import save_checkpoint  # noqa: E402
from ember.models import Transformer, preset  # noqa: E402
from ember.recipes.serve import Config, ServerThread  # noqa: E402
from ember.tokenizer import train_bpe  # noqa: E402

TEXT = ["the quick brown fox jumps over the lazy dog. ", "hello world, hello there! ", "once upon a time "]
KEYS = ["sk-one", "sk-two"]


class Server(ServerThread):
    """The server in a thread, with the clients the tests use."""

    def client(self, key=KEYS[0]):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def raw(self, method, path, body=None, key=KEYS[0], headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = {"Content-Type": "application/json", **(headers or {})}
        if key:
            h["Authorization"] = f"Bearer {key}"
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        out = r.status, r.read().decode()
        conn.close()
        return out

    def metric(self, name):
        _, text = self.raw("GET", "/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = train_bpe(iter([t * 30 for t in TEXT]), vocab_size=300)
    tok.save(root / "tok")
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", block_size=256))
    model.init_weights(0)
    return save_checkpoint(model, root / "tiny", tokenizer_dir=root / "tok")


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(Config(checkpoint=str(ckpt), api_key=list(KEYS), engine=EngineConfig(block_size=8, kv_memory_mb=8)))
    yield s
    s.stop()


def _greedy_text(ckpt, prompt, n):
    return api.generate(str(ckpt), prompt, max_new_tokens=n, temperature=0)[0]


def test_models_health_and_page(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    assert server.raw("GET", "/health", key=None) == (200, '{"status":"ok"}')
    status, html = server.raw("GET", "/", key=None)
    assert status == 200 and "/v1/chat/completions" in html


def test_completion_equals_generate_with_exact_usage(server, ckpt):
    c = server.client()
    prompt = "the quick brown"
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == _greedy_text(ckpt, prompt, 12)
    n_prompt = len(api.load(str(ckpt))[1].encode(prompt))
    ids = r.choices[0].text
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 12
    forced = c.completions.create(model="tiny", prompt=prompt, max_tokens=9, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 9 and forced.choices[0].finish_reason == "length"
    assert ids  # some text came back


def test_stream_equals_non_stream(server):
    c = server.client()
    kw = dict(model="tiny", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = c.completions.create(prompt="hello world", **kw)
    chunks = list(c.completions.create(prompt="hello world", stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    msgs = [{"role": "user", "content": "once upon a time"}]
    reply = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    parts = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == reply.choices[0].message.content
    assert parts[-1].usage.completion_tokens == reply.usage.completion_tokens
    finish = [p.choices[0].finish_reason for p in parts if p.choices and p.choices[0].finish_reason]
    assert finish == [reply.choices[0].finish_reason]


def test_n_with_seed_and_stop(server):
    c = server.client()
    kw = dict(model="tiny", prompt="once", max_tokens=12, temperature=1.0, n=3, seed=11)
    a = [ch.text for ch in c.completions.create(**kw).choices]
    b = [ch.text for ch in c.completions.create(**kw).choices]
    assert a == b and len(set(a)) > 1
    greedy = c.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[4:7]
    cut = c.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"


def test_logprobs_and_echo_match_the_forward(server, ckpt):
    c = server.client()
    model, tok = api.load(str(ckpt))
    r = c.completions.create(model="tiny", prompt="hello world", max_tokens=5, temperature=0, logprobs=2,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # keyed by text: two byte tokens may share one
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(chosen)  # greedy picks the top one
    # lm-eval's loglikelihood request: echo the prompt with its logprobs, generate nothing
    text = "the quick brown fox jumps"
    e = c.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    ids = tok.encode(text)
    got = e.choices[0].logprobs.token_logprobs
    assert e.choices[0].text == text and got[0] is None and len(got) == len(ids)
    with torch.inference_mode():
        logp = F.log_softmax(model(torch.tensor([ids]))[0, :, : tok.vocab_size], dim=-1)  # the tokenizer's ids
    want = logp[:-1].gather(1, torch.tensor(ids[1:]).view(-1, 1)).view(-1)
    torch.testing.assert_close(torch.tensor(got[1:]), want, rtol=0, atol=1e-5)
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)


def test_bad_requests_keys_and_limits(server):
    c = server.client()
    for bad in (dict(temperature=-1), dict(max_tokens=100000), dict(n=99), dict(top_p=0), dict(logprobs=50)):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="hi", **{"max_tokens": 4, **bad})
        assert e.value.status_code == 400 and e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    status, body = server.raw("GET", "/v1/models", key=None)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert server.raw("GET", "/metrics", key=None)[0] == 401  # every route but /health needs the key
    assert server.client(key=KEYS[1]).models.list().data  # the second key works too
    status, body = server.raw("POST", "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    status, body = server.raw("POST", "/v1/completions", {"model": "tiny", "prompt": "x" * (2 << 20)})
    assert status == 413
    status, body = server.raw("POST", "/v1/completions", {"prompt": "hi", "suffix": "x"})
    assert status == 400 and json.loads(body)["error"]["param"] == "suffix"
    assert server.raw("GET", "/v1/nothing")[0] == 404
    # still answering
    assert c.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0).choices


def test_32_concurrent_clients_equal_one_by_one(server, ckpt):
    prompts = [("the quick brown fox " * (1 + i % 5))[: 5 + 7 * i] for i in range(32)]
    lens = [4 + (i * 5) % 20 for i in range(32)]
    c = server.client()

    def one(i):
        return c.completions.create(model="tiny", prompt=prompts[i], max_tokens=lens[i], temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    want = [_greedy_text(ckpt, p, n) for p, n in zip(prompts, lens)]
    assert got == want
    deadline = time.time() + 5
    while server.metric("ember_kv_blocks_used") and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("ember_kv_blocks_used") == 0
    assert server.metric("ember_time_to_first_token_seconds_count") >= 32


def test_disconnect_mid_stream_frees_blocks(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 240, "temperature": 0, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[0]}"})
    r = conn.getresponse()
    assert r.status == 200
    r.fp.readline()  # the first event
    assert server.metric("ember_kv_blocks_used") > 0
    r.close()
    conn.sock.close() if conn.sock else None
    conn.close()
    deadline = time.time() + 10
    while (server.metric("ember_kv_blocks_used") or server.metric("ember_requests_running")) and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("ember_kv_blocks_used") == 0 and server.metric("ember_requests_running") == 0
    assert server.engine.stats["generated_tokens"] < 10_000


def test_queue_full_is_429(ckpt):
    s = Server(Config(checkpoint=str(ckpt), max_queue=0, engine=EngineConfig(block_size=8, kv_memory_mb=4,
                                                                            max_num_seqs=1)))
    try:
        c = s.client()
        stream = c.completions.create(model="tiny", prompt="hello", max_tokens=200, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        next(iter(stream))
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="tiny", prompt="hi", max_tokens=2)
        stream.close()
    finally:
        s.stop()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_chat_page_streams_in_a_browser(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium); the page test needs a browser")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#key", KEYS[0])
        page.dispatch_event("#key", "change")
        page.fill("#temp", "0")
        page.fill("#input", "hello")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.assistant').length == 1 && "
                               "document.getElementById('send').disabled == false", timeout=30000)
        text = page.inner_text(".assistant")
        stats = page.inner_text("#stats")
        browser.close()
    reply = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                    temperature=0.0).choices[0].message.content
    assert text.strip() == reply.strip() and "tok/s" in stats


def test_serves_an_adapter_checkpoint_merged(ckpt, tmp_path):
    """A LoRA adapter checkpoint (ember finetune's output) is served merged into its base; its greedy
    text equals the unmerged adapter model's."""
    from ember.io.adapter import save_adapter
    from ember.io.checkpoint import load_checkpoint, save_adapter_checkpoint
    from ember.peft.lora import LoRAConfig, apply_lora

    model, _ = load_checkpoint(ckpt)
    lora = LoRAConfig(r=4, alpha=8, targets=["all-linear"])
    apply_lora(model, lora, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(hash(name) % 1000))
    out = save_adapter_checkpoint(tmp_path / "adapter", model.cfg, ckpt,
                                  lambda d: save_adapter(model, model.cfg, lora, d, base=str(ckpt)),
                                  tokenizer_dir=ckpt / "tokenizer")
    tok = api.load(str(out))[1]
    prompt = "the quick brown"
    want = api.generate(str(out), prompt, max_new_tokens=10, temperature=0)[0]  # unmerged LoRA modules
    assert want != _greedy_text(ckpt, prompt, 10)  # the adapter changes the model
    s = Server(Config(checkpoint=str(out), engine=EngineConfig(block_size=8, kv_memory_mb=4)))
    try:
        r = s.client().completions.create(model="adapter", prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == len(tok.encode(prompt))
    finally:
        s.stop()


def test_a_taken_port_is_a_clear_error_before_loading():
    import socket

    from ember.errors import EmberError
    from ember.recipes.serve import check_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(EmberError, match="--port"):
            check_port("127.0.0.1", s.getsockname()[1])
