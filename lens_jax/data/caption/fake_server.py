"""A local OpenAI-compatible chat-completions server with scripted faults, for tests and benchmarks.

    python -m lens_jax.data.caption.fake_server [--port 0] [--latency 0.05]    (prints its base URL)

``POST /v1/chat/completions`` answers every request after ``latency`` seconds with a valid caption
JSON, unless a fault is scheduled. The image a request is about is told by the ``X-Caption-Item``
header the captioner sends (a hash of its key, :func:`request.item_id`), else by a hash of the image
data (or of the messages, for a text-only request). ``plan`` maps such an id to a list of faults for that image's 1st, 2nd, ... request (then
``default``); ``script(body, item, attempt, n)`` (n: the request's global index) may decide instead.
Faults:

    ok         200, {"dense_caption": ..., "short_caption": ...}
    500, 503   HTTP error
    429        HTTP 429 with ``Retry-After: <retry_after>``
    400        HTTP 400 (a request the server will not take)
    401, 404   fatal for a client (bad key, unknown model)
    timeout    answers only after ``hang_s`` (longer than the client's timeout)
    empty      200 with an empty answer
    refusal    200, "I'm sorry, but I can't help with that request."
    malformed  200 with broken JSON ('{"dense_caption": "A picture of')
    short      200 with a 3-word dense caption (fails word-count validation)
    fenced     200 with the JSON inside a ```json fence after a sentence (valid, lenient parsing)
    length     200 with finish_reason "length" (cut off)
    nousage    200, valid, without a usage report

Every request is recorded (:attr:`FakeOpenAI.requests`); ``ok_count(item)`` counts the valid answers
served for an image, which is what "no duplicate requests for finished images" is checked against.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping, Sequence

ITEM_HEADER = "X-Caption-Item"
FAULTS = ("ok", "500", "503", "429", "400", "401", "404", "timeout", "empty", "refusal", "malformed", "short",
          "fenced", "length", "nousage")
VALID = ("ok", "fenced", "nousage")  # faults whose answer a captioner accepts
REFUSAL = "I'm sorry, but I can't help with that request."


@dataclasses.dataclass
class Served:
    n: int  # global request index
    item: str
    attempt: int  # this image's request index (0 = its first)
    fault: str
    t: float  # time.monotonic() at arrival
    model: str = ""
    sent_size: tuple[int, int] | None = None  # the image's size as sent (inspect_images=True)


def dense_text(item: str, words: int = 40) -> str:
    base = (f"A test image with id {item}. A red square sits in the upper left corner above two blue circles "
            f"on a plain white background; the word \"TEST\" is written in black capital letters at the bottom. "
            f"Flat vector illustration with even lighting and no shadows.")
    return " ".join(base.split()[:max(3, words)])


def answer_for(fault: str, item: str) -> str | None:
    ok = json.dumps({"dense_caption": dense_text(item), "short_caption": f"Shapes and text, image {item}."})
    return {
        "ok": ok, "nousage": ok, "length": ok[: len(ok) // 2],
        "fenced": f"Here are the captions:\n```json\n{ok}\n```",
        "empty": "",
        "refusal": REFUSAL,
        "malformed": '{"dense_caption": "A picture of',
        "short": json.dumps({"dense_caption": "A red square.", "short_caption": "A square."}),
    }.get(fault)


class FakeOpenAI:
    def __init__(self, plan: Mapping[str, Sequence[str]] | None = None, *, default: str = "ok",
                 script: Callable[[dict, str, int, int], str] | None = None, latency: float = 0.0,
                 hang_s: float = 5.0, retry_after: float = 0.1, prompt_tokens: int = 100,
                 completion_tokens: int = 50, inspect_images: bool = False, host: str = "127.0.0.1", port: int = 0):
        for f in [default, *(f for faults in (plan or {}).values() for f in faults)]:
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}; one of {FAULTS}")
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.default = default
        self.script = script
        self.latency = float(latency)
        self.hang_s = float(hang_s)
        self.retry_after = retry_after
        self.prompt_tokens = int(prompt_tokens)
        self.completion_tokens = int(completion_tokens)
        self.inspect_images = inspect_images
        self.requests: list[Served] = []
        self._per_item: Counter = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends sleeping handlers at shutdown
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: no new connection per request
            timeout = 60  # idle keep-alive connections end eventually

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # Headers and body go out in two writes: without this, Nagle's algorithm holds the body
                # back until the client's delayed ACK (~40 ms on Linux) on a kept-alive connection.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _send(self, status: int, payload: dict, headers: Mapping[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True  # the client gave up (timeout)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                try:
                    body = json.loads(raw or b"{}")
                    url = _image_url(body)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    self._send(400, {"error": {"message": f"bad request: {exc}", "type": "invalid_request_error"}})
                    return
                ident = url if url is not None else json.dumps(body.get("messages"), sort_keys=True)
                item = self.headers.get(ITEM_HEADER) or hashlib.sha256(ident.encode()).hexdigest()[:16]
                fake._handle(self, body, item, url)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.server.request_queue_size = 256
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://{host}:{self.server.server_address[1]}/v1"

    # ------------------------------------------------------------------ serving

    def _handle(self, h, body: dict, item: str, url: str) -> None:
        t = time.monotonic()
        with self.lock:
            n = len(self.requests)
            attempt = self._per_item[item]
            self._per_item[item] += 1
            planned = self.plan.get(item, ())
            fault = planned[attempt] if attempt < len(planned) else self.default
            rec = Served(n, item, attempt, fault, t, str(body.get("model", "")))
            self.requests.append(rec)
        if self.script is not None:
            fault = self.script(body, item, attempt, n) or fault
            rec.fault = fault
        if self.inspect_images and url is not None:
            rec.sent_size = _image_size(url)
        delay = self.latency + (self.hang_s if fault == "timeout" else 0.0)
        if delay > 0 and self.release.wait(delay):
            return  # shutting down
        model = str(body.get("model", "m"))
        if fault in ("500", "503", "400", "401", "404", "429"):
            status = int(fault)
            headers = {"Retry-After": f"{self.retry_after:g}"} if status == 429 else {}
            h._send(status, {"error": {"message": f"scripted {status}", "type": "server_error", "code": status}},
                    headers)
            return
        content = answer_for("ok" if fault == "timeout" else fault, item)
        payload = {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "length" if fault == "length" else "stop"}],
        }
        if fault != "nousage":
            payload["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                                "total_tokens": self.prompt_tokens + self.completion_tokens}
        h._send(200, payload)

    # ------------------------------------------------------------------ inspection

    def count(self, item: str) -> int:
        """Requests received for an image."""
        with self.lock:
            return self._per_item[item]

    def ok_count(self, item: str) -> int:
        """Valid answers served for an image."""
        with self.lock:
            return sum(1 for r in self.requests if r.item == item and r.fault in VALID)

    def served(self, item: str | None = None) -> list[Served]:
        with self.lock:
            return [r for r in self.requests if item is None or r.item == item]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _image_url(body: dict) -> str | None:
    """The data URL of the request's image; None for a text-only request; raises when malformed."""
    for m in body["messages"]:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    if not url.startswith("data:image/"):
                        raise ValueError("image_url is not a data:image/ URL")
                    return url
    return None


def _image_size(url: str) -> tuple[int, int] | None:
    try:
        from PIL import Image

        data = base64.b64decode(url.split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lens_jax.data.caption.fake_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--default", default="ok", choices=FAULTS, help="the answer to every request")
    args = p.parse_args(argv)
    server = FakeOpenAI(latency=args.latency, default=args.default, host=args.host, port=args.port)
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
