"""Win rate against a reference: the HTTP judge against a local stub of /v1/chat/completions (auth header,
retries, order swapping, resumable cache), the verifier and local LLM judges, and win_rate_eval's numbers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spa_lite.http_judge import CACHE_FILE, HTTPJudge, _chat_url
from spa_lite.metrics import win_rate
from spa_lite.pairwise import JudgeError, JudgeItem, PairwiseJudge, format_question, parse_verdict
from spa_lite.winrate import LocalLLMJudge, VerifierJudge, win_rate_eval

KEY = "sk-test-key-123"
START_A, END_A = "[The Start of Response (A)]\n", "\n[The End of Response (A)]"
START_B, END_B = "[The Start of Response (B)]\n", "\n[The End of Response (B)]"
FORMATS = ["[[{}]]", "({})", "{}", "Response {}", "**{}**", "The better response is {}."]


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


class Stub:
    """State of the stub endpoint: every request is recorded; ``plan(attempt, body)`` may answer an error first.

    Default verdict: the response containing "GOOD"; when both or neither do, "A" (a position-biased judge).
    """

    MAX_REQUESTS = 200  # a runaway client gets 400s, which the judge does not retry

    def __init__(self):
        self.requests: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.plan = lambda attempt, body: None  # -> None or (status, delay_s)
        self.always_a = False
        self.lock = threading.Lock()

    def answer(self, body: dict, n: int) -> str:
        text = body["messages"][-1]["content"]
        a, b = _between(text, START_A, END_A), _between(text, START_B, END_B)
        letter = "A" if self.always_a or ("GOOD" in a) == ("GOOD" in b) else ("A" if "GOOD" in a else "B")
        return FORMATS[n % len(FORMATS)].format(letter)


@pytest.fixture
def stub(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SPA_TEST_JUDGE_KEY", KEY)
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        timeout = 5

        def log_message(self, *args):
            pass

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.loads(raw)
            with state.lock:
                n = len(state.requests)
                state.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                attempt = state.attempts[raw] = state.attempts.get(raw, 0) + 1
            if n >= Stub.MAX_REQUESTS:
                return self._send(400, {"error": "too many requests in this test"})
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": "not found"})
            planned = state.plan(attempt, body)
            if planned is not None:
                status, delay = planned
                if delay:
                    threading.Event().wait(delay)
                if status != 200:
                    return self._send(status, {"error": f"planned {status}"}, {"Retry-After": "0"})
            content = state.answer(body, n)
            self._send(200, {"id": f"c{n}", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                          "finish_reason": "stop"}]})

        def _send(self, status, obj, headers=None):
            data = json.dumps(obj).encode()
            try:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client timed out and left

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, address: None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def make_judge(stub, **kw):
    kw.setdefault("api_key_env", "SPA_TEST_JUDGE_KEY")
    kw.setdefault("backoff", 0.001)
    kw.setdefault("timeout", 5)
    kw.setdefault("batch_size", 4)
    return HTTPJudge(stub.url, "judge-model", **kw)


def items(pairs):
    return [JudgeItem([{"role": "user", "content": f"Question {i}?"}], a, b) for i, (a, b) in enumerate(pairs)]


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("[[A]]", "A"), ("[[B]]", "B"), ("(A)", "A"), (" (B) ", "B"), ("A", "A"), ("B\n", "B"), ("Response A", "A"),
    ("Response (B) is better.", "B"), ("**A**", "A"), ("B.", "B"), ("A\n\nA is more helpful.", "A"),
    ("Answer: B", "B"), ("The better response is A.", "A"), ("I compared them. [[A]] ... final verdict: [[B]]", "B"),
    ("(A) and (B) are equally good", None), ("", None), (None, None), ("Neither.", None), ("a", None),
])
def test_parse_verdict(text, want):
    assert parse_verdict(text) == want


def test_chat_url_and_question_formatting():
    assert _chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert _chat_url("https://api.x.com/v1/") == "https://api.x.com/v1/chat/completions"
    assert _chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    assert format_question([{"role": "user", "content": "Hi?"}]) == "Hi?"
    multi = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Q1"},
             {"role": "assistant", "content": "R1"}, {"role": "user", "content": "Q2"}]
    assert format_question(multi) == "User: Q1\n\nAssistant: R1\n\nUser: Q2"


def test_http_judge_verdicts_both_orders_and_auth(stub):
    judge = make_judge(stub)
    assert isinstance(judge, PairwiseJudge)
    got = judge.judge(items([("GOOD one", "bad"), ("bad", "GOOD two"), ("GOOD x", "GOOD y"), ("meh", "meh2")]))
    # clear wins and losses in both orders; where the stub cannot tell it always says "A": 0.5 after swapping
    assert got == [1.0, 0.0, 0.5, 0.5]
    assert len(stub.requests) == 8
    assert {r["auth"] for r in stub.requests} == {f"Bearer {KEY}"}
    assert {r["path"] for r in stub.requests} == {"/v1/chat/completions"}
    body = stub.requests[0]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 16
    # each item was shown both ways round
    shown = {(_between(r["body"]["messages"][-1]["content"], START_A, END_A),
              _between(r["body"]["messages"][-1]["content"], START_B, END_B)) for r in stub.requests}
    assert ("GOOD one", "bad") in shown and ("bad", "GOOD one") in shown
    assert KEY not in repr(judge) and KEY not in json.dumps(vars(judge), default=str)


def test_position_biased_judge_scores_one_half(stub):
    stub.always_a = True
    got = make_judge(stub).judge(items([("GOOD", "bad"), ("bad", "GOOD"), ("x", "y")]))
    assert got == [0.5, 0.5, 0.5]


def test_no_key_header_when_api_key_env_is_none(stub):
    make_judge(stub, api_key_env=None).judge(items([("GOOD", "bad")]))
    assert [r["auth"] for r in stub.requests] == [None, None]


def test_missing_key_is_a_clear_error_without_requests(stub, monkeypatch):
    monkeypatch.delenv("SPA_TEST_JUDGE_KEY")
    with pytest.raises(JudgeError, match="SPA_TEST_JUDGE_KEY is not set"):
        make_judge(stub).judge(items([("GOOD", "bad")]))
    assert stub.requests == []


def test_retries_on_429_500_and_timeouts(stub):
    # every distinct request: 429, then 500, then a 0.6 s stall past the 0.3 s timeout, then an answer
    stub.plan = lambda attempt, body: {1: (429, 0), 2: (500, 0), 3: (200, 0.6)}.get(attempt)
    judge = make_judge(stub, timeout=0.3, max_retries=4)
    assert judge.judge(items([("GOOD", "bad"), ("bad", "GOOD")])) == [1.0, 0.0]
    assert len(stub.requests) == 4 * 4
    assert judge.stats["retries"] == 3 * 4


def test_retries_give_up_with_a_clear_error(stub):
    stub.plan = lambda attempt, body: (503, 0)
    with pytest.raises(JudgeError, match=r"failed after 3 attempts.*HTTP 503") as e:
        make_judge(stub, max_retries=2).judge(items([("GOOD", "bad")]))
    assert KEY not in str(e.value)
    assert len(stub.requests) == 2 * 3


def test_client_errors_are_not_retried(stub):
    stub.plan = lambda attempt, body: (401, 0)
    with pytest.raises(JudgeError, match="refused the request.*HTTP 401"):
        make_judge(stub, max_retries=4).judge(items([("GOOD", "bad")]))
    assert len(stub.requests) == 2


def test_cache_second_run_makes_no_requests_and_survives_a_torn_line(stub, tmp_path):
    pairs = [("GOOD a", "bad"), ("bad", "GOOD b"), ("GOOD c", "GOOD d")]
    first = make_judge(stub, cache_dir=tmp_path).judge(items(pairs))
    assert len(stub.requests) == 6
    cache = tmp_path / CACHE_FILE
    text = cache.read_text()
    assert len(text.splitlines()) == 6 and KEY not in text

    second = make_judge(stub, cache_dir=tmp_path)
    assert second.judge(items(pairs)) == first == [1.0, 0.0, 0.5]
    assert len(stub.requests) == 6 and second.stats["cache_hits"] == 6

    with open(cache, "a") as f:  # a crash in the middle of an append
        f.write('{"key": "0123abc", "model": "judge-model", "cont')
    third = make_judge(stub, cache_dir=tmp_path)
    more = pairs + [("GOOD e", "bad")]
    assert third.judge(items(more)) == [1.0, 0.0, 0.5, 1.0]
    assert third.stats["cache_skipped_lines"] == 1 and len(stub.requests) == 8
    lines = cache.read_text().splitlines()
    assert len(lines) == 9 and sum(1 for ln in lines if ln.endswith("cont")) == 1
    assert all(json.loads(ln)["key"] for ln in lines if not ln.endswith("cont"))

    fourth = make_judge(stub, cache_dir=tmp_path)
    assert fourth.judge(items(more)) == [1.0, 0.0, 0.5, 1.0]
    assert len(stub.requests) == 8


def test_an_interrupted_run_resumes_without_re_asking(stub, tmp_path, monkeypatch):
    pairs = [("GOOD a", "bad"), ("bad", "GOOD b"), ("GOOD c", "bad c")]
    stub.plan = lambda attempt, body: (503, 0) if "bad c" in body["messages"][-1]["content"] else None
    with pytest.raises(JudgeError, match="rerun to resume"):
        make_judge(stub, cache_dir=tmp_path, max_retries=0, batch_size=2).judge(items(pairs))
    assert len(stub.requests) == 6
    stub.plan = lambda attempt, body: None
    assert make_judge(stub, cache_dir=tmp_path).judge(items(pairs)) == [1.0, 0.0, 1.0]
    assert len(stub.requests) == 8  # only the failed item's two requests were asked again
    # a fully cached evaluation needs no key at all
    monkeypatch.delenv("SPA_TEST_JUDGE_KEY")
    assert make_judge(stub, cache_dir=tmp_path).judge(items(pairs)) == [1.0, 0.0, 1.0]


def test_win_rate_eval_with_the_http_judge(stub, tmp_path):
    cands = ["GOOD 0", "bad 1", "GOOD 2", "GOOD 3", "x 4"]
    refs = ["bad 0", "GOOD 1", "bad 2", "GOOD 3", "y 4"]
    prompts = [[{"role": "user", "content": f"Q{i}"}] for i in range(5)]
    res = win_rate_eval(cands, refs, prompts, make_judge(stub, cache_dir=tmp_path), chunk_size=2)
    # outcomes 1, 0, 1, 0.5, 0.5 -> 3/5
    assert (res["n"], res["wins"], res["ties"], res["losses"]) == (5, 2, 2, 1)
    assert res["win_rate"] == pytest.approx(0.6)
    assert [it["verdict_ab"] for it in res["items"]] == ["A", "B", "A", "A", "A"]
    assert [it["verdict_ba"] for it in res["items"]] == ["B", "A", "B", "A", "A"]


# ---------------------------------------------------------------------------------------------------------


def test_verifier_judge_on_hand_made_cases():
    no_commas = {"constraint": {"kind": "no_commas", "params": {}}}
    max3 = {"kind": "max_words", "params": {"n": 3}}  # the metadata may be the constraint itself
    q = [{"role": "user", "content": "Q"}]
    cases = [
        (JudgeItem(q, "No commas here", "Yes, commas", no_commas), 1.0),
        (JudgeItem(q, "Oh, a comma", "Clean answer", no_commas), 0.0),
        (JudgeItem(q, "Clean", "Also clean", no_commas), 0.5),
        (JudgeItem(q, "a, b", "c, d", no_commas), 0.5),
        (JudgeItem(q, "Three short words", "this one has five words", max3), 1.0),
        (JudgeItem(q, "   ", "ok", max3), 0.0),  # an empty response never passes
    ]
    judge = VerifierJudge()
    assert judge.judge([c for c, _ in cases]) == [w for _, w in cases]
    assert judge.judge_details(cases[0][:1])[0] == {"p": 1.0, "candidate_pass": True, "reference_pass": False}
    custom = VerifierJudge(lambda r, c: r.startswith(c["prefix"]))
    assert custom.judge([JudgeItem(q, "yes!", "no", {"constraint": {"prefix": "yes"}})]) == [1.0]
    with pytest.raises(ValueError, match="metadata"):
        judge.judge([JudgeItem(q, "a", "b")])


def test_win_rate_eval_against_a_hand_computation():
    ps = [1.0, 0.0, 0.5, 1.0, 0.7, 0.3, 0.5]
    seen = []

    class Fixed:
        def judge(self, its):
            seen.append(its)
            start = sum(len(s) for s in seen[:-1])
            return ps[start : start + len(its)]

    cands = [f"c{i}" for i in range(7)]
    refs = [f"r{i}" for i in range(7)]
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(7)]
    meta = [{"i": i} for i in range(7)]
    batches = []
    res = win_rate_eval(cands, refs, prompts, Fixed(), meta, chunk_size=3, on_batch=batches.append)
    assert batches == [3, 3, 1]
    it = seen[1][0]
    assert (it.prompt, it.response_a, it.response_b, it.metadata) == (prompts[3], "c3", "r3", {"i": 3})
    outcomes = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5]
    assert [r["outcome"] for r in res["items"]] == outcomes
    assert [r["p"] for r in res["items"]] == ps and [r["index"] for r in res["items"]] == list(range(7))
    assert (res["n"], res["wins"], res["ties"], res["losses"]) == (7, 3, 2, 2)
    assert res["win_rate"] == pytest.approx(4 / 7)
    assert res["mean_p"] == pytest.approx(4.0 / 7)
    ref = win_rate(outcomes)
    assert (res["ci_low"], res["ci_high"]) == (ref["ci_low"], ref["ci_high"])
    assert res["ci_low"] <= res["win_rate"] <= res["ci_high"]

    seen.clear()
    wide = win_rate_eval(cands, refs, prompts, Fixed(), tie_margin=0.25)  # 0.7 and 0.3 become ties
    assert [r["outcome"] for r in wide["items"]] == [1.0, 0.0, 0.5, 1.0, 0.5, 0.5, 0.5]
    assert wide["win_rate"] == pytest.approx((1 + 0 + 0.5 + 1 + 0.5 + 0.5 + 0.5) / 7)

    with pytest.raises(ValueError, match="differ in length"):
        win_rate_eval(cands, refs[:-1], prompts, Fixed())
    empty = win_rate_eval([], [], [], Fixed())
    assert empty["n"] == 0 and empty["items"] == []


def test_local_llm_judge_wraps_judge_llm(tiny_model_dir):
    import torch

    from spa_lite.models import load_base_model
    from spa_lite.stack import build_stack

    torch.set_num_threads(1)
    base, tok = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    stack = build_stack(base, tok, (), trainable="seed")
    q = [{"role": "user", "content": "How do I boil an egg?"}]
    fwd = [JudgeItem(q, "Boil it for eight minutes.", "no idea"), JudgeItem(q, "Ask a fox.", "Use water.")]
    rev = [JudgeItem(q, it.response_b, it.response_a) for it in fwd]
    judge = LocalLLMJudge(stack, [], batch_size=2)
    p, p_rev = judge.judge(fwd), judge.judge(rev)
    assert all(0.0 <= x <= 1.0 for x in p)
    # both presentation orders are averaged, so swapping candidate and reference gives 1 - p
    assert [a + b for a, b in zip(p, p_rev)] == pytest.approx([1.0, 1.0], abs=1e-5)
    res = win_rate_eval([it.response_a for it in fwd], [it.response_b for it in fwd], [q, q], judge)
    assert [r["p"] for r in res["items"]] == pytest.approx(p, abs=1e-6)
    assert {"p_order_ab", "p_order_ba"} <= set(res["items"][0])


def test_http_judge_parts_on_their_own(tmp_path):
    from spa_lite.http_judge import AnswerCache, JudgePrompt, fetch_concurrently, score_both_orders

    # scoring: named in both orders = win, named once = tie, an unclear answer counts one half
    assert score_both_orders("[[A]]", "[[B]]")["p"] == 1.0
    assert score_both_orders("[[B]]", "[[A]]")["p"] == 0.0
    assert score_both_orders("[[A]]", "[[A]]")["p"] == 0.5
    assert score_both_orders("A", "no idea") == {"p": 0.75, "verdict_ab": "A", "verdict_ba": None,
                                                 "answer_ab": "A", "answer_ba": "no idea"}

    prompt = JudgePrompt("m", "Q={question} A={a} B={b}", system="sys", max_tokens=None, extra_body={"seed": 1})
    assert prompt.payload("q", "x", "y") == {
        "model": "m", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Q=q A=x B=y"}],
        "temperature": 0.0, "seed": 1}

    cache = AnswerCache(tmp_path / "c.jsonl", "m")
    cache.store(AnswerCache.key({"a": 1}), "[[A]]")
    assert AnswerCache(tmp_path / "c.jsonl", "m").answers() == {AnswerCache.key({"a": 1}): "[[A]]"}
    memory = AnswerCache(None, "m")
    memory.store("k", "v")
    assert memory.answers() == {"k": "v"}

    # a failing job: its round finishes (and is stored) before the error is raised; later rounds never start
    done = []

    def fetch(k, p):
        if k == "bad":
            raise JudgeError("no")
        done.append(k)

    with pytest.raises(JudgeError, match="no"):
        fetch_concurrently([("a", {}), ("bad", {}), ("c", {}), ("d", {}), ("e", {})], fetch, workers=3)
    assert sorted(done) == ["a", "c"]
