"""Prompt reasoner against a real OpenAI-compatible HTTP server started on 127.0.0.1 by each test."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lens_jax import reasoner as cli
from lens_jax.sample.reasoner import (
    DEFAULT_SYSTEM_PROMPT_FILE,
    ReasonerWarning,
    load_system_prompt,
    rewrite_prompt,
)

REPO = Path(__file__).resolve().parents[2]
FAST = dict(backoff=0.01, max_backoff=0.05)  # keep the retry sleeps short in tests


def _completion(content: str | None, model: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
    }


class FakeLLM:
    """POST /v1/chat/completions; ``script(body, n)`` -> (status, content, headers, delay_s)."""

    def __init__(self, script):
        self.script = script
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends sleeping handlers at shutdown
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake.lock:
                    fake.requests.append(body)
                    fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                    n = len(fake.requests) - 1
                if self.path.rstrip("/") != "/v1/chat/completions":
                    status, payload, headers, delay = 404, {"error": {"message": "not found"}}, {}, 0
                else:
                    status, content, headers, delay = fake.script(body, n)
                    payload = _completion(content, body.get("model", "m")) if status == 200 else {
                        "error": {"message": f"scripted {status}", "type": "server_error", "code": status}}
                if delay and fake.release.wait(delay):
                    return  # shutting down
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def llm():
    servers = []

    def start(script):
        s = FakeLLM(script)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _user(body):
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def _system(body):
    return next((m["content"] for m in body["messages"] if m["role"] == "system"), None)


def echo(body, n):
    return 200, f"  DENSE[{_user(body)}]  \n", {}, 0


# ----------------------------------------------------------------------------- rewrite_prompt


def test_rewrite_used_and_system_prompt_from_file(llm, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = llm(echo)
    sp = tmp_path / "sp.txt"
    sp.write_text("SYSTEM-MARKER describe densely\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on success
        out = rewrite_prompt("a red cube", model="tiny-llm", base_url=server.base_url, system_prompt_file=str(sp), **FAST)
    assert out == "DENSE[a red cube]"  # the answer, stripped
    (body,) = server.requests
    assert body["model"] == "tiny-llm"
    assert _system(body) == "SYSTEM-MARKER describe densely"
    assert _user(body) == "a red cube"
    assert server.headers[0].get("authorization") == "Bearer EMPTY"  # the placeholder key


def test_default_system_prompt_and_api_key(llm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    server = llm(echo)
    assert rewrite_prompt("a cat", model="m", base_url=server.base_url, **FAST) == "DENSE[a cat]"
    assert rewrite_prompt("a dog", model="m", base_url=server.base_url, api_key="sk-arg", **FAST) == "DENSE[a dog]"
    default = load_system_prompt()
    assert default == DEFAULT_SYSTEM_PROMPT_FILE.read_text().strip()
    for word in ("colour", "shape", "size", "texture", "quantity", "text", "spatial", "background", "Output only"):
        assert word in default
    assert _system(server.requests[0]) == default
    assert server.headers[0]["authorization"] == "Bearer sk-from-env"
    assert server.headers[1]["authorization"] == "Bearer sk-arg"


def test_500_gives_original_prompt_and_warning(llm):
    server = llm(lambda body, n: (500, None, {}, 0))
    t0 = time.monotonic()
    with pytest.warns(ReasonerWarning, match="HTTP 500"):
        out = rewrite_prompt("a red cube", model="m", base_url=server.base_url, retries=2, **FAST)
    assert out == "a red cube"
    assert len(server.requests) == 3  # 1 try + 2 retries
    assert time.monotonic() - t0 < 5


def test_429_then_ok_succeeds_after_retry(llm):
    server = llm(lambda body, n: (429, None, {"Retry-After": "0"}, 0) if n == 0 else echo(body, n))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = rewrite_prompt("two blue birds", model="m", base_url=server.base_url, retries=2, **FAST)
    assert out == "DENSE[two blue birds]"
    assert len(server.requests) == 2


def test_429_forever_warns(llm):
    server = llm(lambda body, n: (429, None, {}, 0))
    with pytest.warns(ReasonerWarning, match="HTTP 429"):
        assert rewrite_prompt("x y", model="m", base_url=server.base_url, retries=1, **FAST) == "x y"
    assert len(server.requests) == 2


def test_timeout_gives_original_prompt_within_bound(llm):
    server = llm(lambda body, n: (200, "too late", {}, 5.0))
    t0 = time.monotonic()
    with pytest.warns(ReasonerWarning, match="timed out"):
        out = rewrite_prompt("a lighthouse", model="m", base_url=server.base_url, timeout=0.3, retries=1, **FAST)
    assert out == "a lighthouse"
    assert len(server.requests) == 2
    assert time.monotonic() - t0 < 3


def test_total_time_is_bounded(llm):
    server = llm(lambda body, n: (200, "too late", {}, 5.0))
    t0 = time.monotonic()
    with pytest.warns(ReasonerWarning):
        out = rewrite_prompt("a boat", model="m", base_url=server.base_url, timeout=0.4, retries=10,
                             max_total_time=1.0, **FAST)
    assert out == "a boat"
    assert time.monotonic() - t0 < 2.0


def test_empty_answer_warns(llm):
    server = llm(lambda body, n: (200, "   ", {}, 0))
    with pytest.warns(ReasonerWarning, match="empty answer"):
        assert rewrite_prompt("a tree", model="m", base_url=server.base_url, retries=1, **FAST) == "a tree"


def test_connection_refused_and_bad_file_never_raise(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.warns(ReasonerWarning, match="connection error"):
        out = rewrite_prompt("a cup", model="m", base_url=f"http://127.0.0.1:{port}/v1", timeout=1, retries=1, **FAST)
    assert out == "a cup"
    with pytest.warns(ReasonerWarning, match="FileNotFoundError"):
        assert rewrite_prompt("a cup", model="m", base_url=f"http://127.0.0.1:{port}/v1",
                              system_prompt_file=str(tmp_path / "missing.txt")) == "a cup"


def test_404_is_not_retried(llm):
    server = llm(echo)
    with pytest.warns(ReasonerWarning, match="HTTP 404"):
        out = rewrite_prompt("a hat", model="m", base_url=server.base_url.removesuffix("/v1") + "/wrong", retries=3, **FAST)
    assert out == "a hat" and len(server.requests) == 1


def test_cli_rewrite_subprocess(llm):
    server = llm(echo)
    env = dict(os.environ, OPENAI_API_KEY="")
    r = subprocess.run(
        [sys.executable, "-m", "lens_jax.reasoner", "rewrite", "--model", "m", "--base-url", server.base_url,
         "a", "red", "cube"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "DENSE[a red cube]"


# ----------------------------------------------------------------------------- optimize


def test_parse_judge_is_robust():
    assert cli.parse_judge('{"score": 0.7, "reason": "ok"}') == (0.7, "ok")
    assert cli.parse_judge('```json\n{"score": 0.25, "reason": "drops the cat"}\n```') == (0.25, "drops the cat")
    assert cli.parse_judge('Sure! {"score": 8, "reason": "good"} hope it helps')[0] == pytest.approx(0.8)
    assert cli.parse_judge('score: 0.4')[0] == pytest.approx(0.4)
    assert cli.parse_judge("0.9")[0] == pytest.approx(0.9)
    assert cli.parse_judge("I cannot grade this")[0] is None
    assert cli.parse_improvement("<summary>s</summary>\n<system_prompt>\nNEW\n</system_prompt>") == ("s", "NEW")
    assert cli.parse_improvement("just a prompt") == ("", "just a prompt")


SCORES = {"V1": 0.3, "V2": 0.9, "V3": 0.5}


def scripted(body, n):
    """Rewrites tagged with the system prompt's version; the judge scores by tag; the meta-prompt bumps it."""
    system, user = _system(body), _user(body)
    if system is not None and system.startswith("You grade rewrites"):
        tag = re.search(r"\[(V\d)\]", user).group(1)
        answer = json.dumps({"score": SCORES[tag], "reason": f"graded {tag}"})
        return 200, (f"```json\n{answer}\n```" if n % 2 else answer), {}, 0
    if system is None and "CURRENT SYSTEM PROMPT" in user:
        v = int(re.search(r"Rewriter prompt \[V(\d)\]", user).group(1))
        return 200, (f"<summary>failures of V{v}</summary>\n"
                     f"<system_prompt>Rewriter prompt [V{v + 1}] be denser</system_prompt>"), {}, 0
    tag = re.search(r"\[(V\d)\]", system).group(1)
    return 200, f"dense description of {user} [{tag}]", {}, 0


def _rewrite_calls(server, tag):
    return sum(1 for b in server.requests if (_system(b) or "").startswith(f"Rewriter prompt [{tag}]"))


def test_optimize_two_rounds_keeps_best_and_resumes(llm, tmp_path):
    server = llm(scripted)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red cube\n\ntwo cats on a sofa\n{\"prompt\": \"a sign saying HELLO\"}\n")
    sp = tmp_path / "sp.txt"
    sp.write_text("Rewriter prompt [V1] describe\n")
    out = tmp_path / "run"
    args = ["optimize", "--model", "m", "--base-url", server.base_url, "--prompts", str(prompts), "--out", str(out),
            "--system-prompt-file", str(sp), "--judge-model", "judge", "--timeout", "10", "--no-progress"]

    assert cli.main(args + ["--rounds", "2"]) == 0
    recs = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [0, 1]
    assert recs[0]["system_prompt"] == "Rewriter prompt [V1] describe"
    assert recs[1]["system_prompt"] == "Rewriter prompt [V2] be denser"
    assert recs[0]["mean_score"] == pytest.approx(0.3) and recs[1]["mean_score"] == pytest.approx(0.9)
    assert [s["prompt"] for s in recs[0]["scores"]] == ["a red cube", "two cats on a sofa", "a sign saying HELLO"]
    assert all(s["score"] == pytest.approx(0.3) and s["reason"] == "graded V1" for s in recs[0]["scores"])
    assert recs[0]["failure_summary"] == "failures of V1"
    assert (out / "best_system_prompt.txt").read_text().strip() == "Rewriter prompt [V2] be denser"
    judged = [b for b in server.requests if (_system(b) or "").startswith("You grade rewrites")]
    assert len(judged) == 6 and all(b["model"] == "judge" for b in judged)
    assert _rewrite_calls(server, "V1") == 3 and _rewrite_calls(server, "V2") == 3

    # Same --rounds: nothing to do, no requests.
    n = len(server.requests)
    assert cli.main(args + ["--rounds", "2"]) == 0
    assert len(server.requests) == n
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2

    # One more round: continues with V3 (worse), earlier rounds not repeated, best stays V2.
    assert cli.main(args + ["--rounds", "3"]) == 0
    recs = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert recs[2]["system_prompt"] == "Rewriter prompt [V3] be denser"
    assert recs[2]["mean_score"] == pytest.approx(0.5)
    assert recs[2]["best_round"] == 1
    assert _rewrite_calls(server, "V1") == 3 and _rewrite_calls(server, "V2") == 3 and _rewrite_calls(server, "V3") == 3
    assert (out / "best_system_prompt.txt").read_text().strip() == "Rewriter prompt [V2] be denser"
