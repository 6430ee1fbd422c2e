"""Dense captioner against a local fault-injecting OpenAI-compatible server on 127.0.0.1.

Every end-to-end test starts its own server (tests/openai_server.py) and captions a few small
generated images; nothing leaves the machine.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared fake server

from openai_server import fake_openai, item_id  # noqa: E402

from lens_jax.data.caption import (  # noqa: E402
    Bounds,
    CaptionConfig,
    Ledger,
    UnreadableImage,
    check_answer,
    encode_image,
    load_captions,
    load_failures,
    load_instruction,
    parse_answer,
    run_captioner,
)
from lens_jax.data.caption.cost import Budget, Prices  # noqa: E402
from lens_jax.data.caption.ledger import LedgerBusy  # noqa: E402
from lens_jax.data.caption.ratelimit import RateLimiter  # noqa: E402
from lens_jax.data.caption.request import backoff_delay, retry_after_seconds  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FAST = dict(backoff=0.01, max_backoff=0.05, progress=False, timeout=5.0)


# ----------------------------------------------------------------------------- helpers


def _picture(i: int, size=(48, 40)) -> Image.Image:
    img = Image.new("RGB", size, ((i * 53) % 256, (i * 97) % 256, (i * 31) % 256))
    d = ImageDraw.Draw(img)
    d.rectangle([i % 10, 3, i % 10 + size[0] // 3, size[1] // 2], fill=(255, 255 - i % 200, 0))
    d.ellipse([size[0] // 2, size[1] // 2, size[0] - 2, size[1] - 2], fill=(0, 0, 255))
    return img


def make_images(folder: Path, names, size=(48, 40)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        _picture(i, size).save(p)
    return list(names)


def png_bytes(i: int, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    _picture(i, size).save(buf, format="PNG")
    return buf.getvalue()


def add_corrupt(folder: Path) -> list[str]:
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg at all")
    (folder / "truncated.png").write_bytes(png_bytes(7, (64, 64))[:120])
    (folder / "notes.txt").write_text("not an image: ignored")
    (folder / ".hidden.png").write_bytes(png_bytes(8))  # hidden: ignored
    return ["broken.jpg", "truncated.png"]


def run(images, out, server, **kw) -> dict:
    cfg = CaptionConfig(images=str(images), out=str(out), model="fake-vlm", base_url=server.base_url,
                        **{**FAST, **kw})
    return run_captioner(cfg)


def caption_lines(out: Path) -> list[dict]:
    """Every line of captions.jsonl parsed strictly (a torn or bad line fails the test)."""
    text = (out / "captions.jsonl").read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("text", [
    '{"dense_caption": "A red cube on a table.", "short_caption": "A cube."}',
    'Sure! Here you go:\n```json\n{"dense_caption": "A red cube on a table.", "short_caption": "A cube."}\n```',
    '{"dense_caption": "A red cube on a table.", "short_caption": "A cube.",}',
    "{'dense_caption': 'A red cube on a table.', 'short_caption': 'A cube.'}",
    '<think>let me look</think>{"Dense Caption": "A red cube on a table.", "Short": "A cube."}',
    'The captions: {"captions": {"dense": "A red cube on a table.", "short": "A cube."}} done',
    '**Dense caption:** A red cube on a table.\n**Short caption:** A cube.',
    '{"dense_caption": "A red cube on a table.", "short_caption": "A cube."',  # unclosed: fields still read
])
def test_parse_answer_is_lenient(text):
    assert parse_answer(text) == ("A red cube on a table.", "A cube.")


def test_check_answer_validation():
    b = Bounds(min_words=5, max_words=30, short_min_words=2, short_max_words=8)
    good = json.dumps({"dense_caption": "Two red apples lie on a wooden table near a window.",
                       "short_caption": "Apples on a table."})
    v = check_answer(good, b)
    assert v.ok and v.dense.startswith("Two red apples") and v.short == "Apples on a table."
    assert check_answer("", b).kind == "empty"
    assert check_answer("  <think>hmm</think>  ", b).kind == "empty"
    for refusal in ["I'm sorry, but I can't help with that.", "I cannot describe this image.",
                    "Sorry, I am unable to assist with this request.", "As an AI, I cannot view images.",
                    json.dumps({"dense_caption": "I'm sorry, I can't help with that request.", "short_caption": "No."})]:
        assert check_answer(refusal, b).kind == "refusal", refusal
    sign = json.dumps({"dense_caption": 'A shop door with a sign that reads "Sorry, we are closed" in red letters.',
                       "short_caption": "A closed shop door."})
    assert check_answer(sign, b).ok  # quoting text is not refusing
    assert check_answer('{"dense_caption": "A picture of', b).kind == "invalid"
    short_dense = json.dumps({"dense_caption": "A red cube.", "short_caption": "A cube."})
    assert "words" in check_answer(short_dense, b).reason
    long_dense = json.dumps({"dense_caption": "word " * 31, "short_caption": "A cube."})
    assert check_answer(long_dense, b).kind == "invalid"
    no_short = "Two red apples lie on a wooden table near a bright window."
    v = check_answer(no_short, b)
    assert v.kind == "invalid" and "short" in v.reason


def test_instruction_asks_for_every_aspect_and_json():
    text = load_instruction().lower()
    for word in ("layout", "attributes", "counts", "text in the image", "style", "background", "dense_caption",
                 "short_caption", "json"):
        assert word in text, word


# ----------------------------------------------------------------------------- images


def test_encode_image_resizes_and_reports_stored_size(tmp_path):
    p = tmp_path / "wide.png"
    _picture(1, (900, 300)).save(p)
    e = encode_image(str(p), max_side=256)
    assert (e.width, e.height) == (900, 300)
    assert (e.sent_width, e.sent_height) == (256, 85)
    assert e.data_url.startswith("data:image/jpeg;base64,")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    e = encode_image(rgba, fmt="auto")
    assert e.mime == "image/png" and (e.sent_width, e.sent_height) == (40, 30)
    e = encode_image(np.zeros((20, 10, 3), np.uint8))  # a decoded tfds image
    assert (e.width, e.height) == (10, 20)
    e = encode_image(np.array(png_bytes(3), dtype=object))  # tfds Tensor(dtype=object) bytes
    assert (e.width, e.height) == (32, 24)
    rotated = tmp_path / "rotated.jpg"  # stored 60x20, EXIF orientation 6: upright it is 20x60
    exif = Image.Exif()
    exif[0x0112] = 6
    _picture(2, (60, 20)).save(rotated, exif=exif)
    e = encode_image(str(rotated), exif_transpose=True)
    assert (e.width, e.height) == (e.sent_width, e.sent_height) == (20, 60)
    assert (encode_image(str(rotated)).width, encode_image(str(rotated)).height) == (60, 20)  # tfds: as stored
    with pytest.raises(UnreadableImage, match="UnidentifiedImageError"):
        encode_image(b"garbage")
    with pytest.raises(UnreadableImage):
        encode_image(png_bytes(2, (64, 64))[:120])  # truncated


# ----------------------------------------------------------------------------- retry pieces


class _Resp:
    def __init__(self, headers):
        self.headers = headers


class _Exc(Exception):
    def __init__(self, headers):
        super().__init__("x")
        self.response = _Resp(headers)


def test_retry_after_and_backoff():
    assert retry_after_seconds(_Exc({"retry-after": "2"})) == 2.0
    assert retry_after_seconds(_Exc({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_seconds(_Exc({"retry-after": date})) <= 31
    assert retry_after_seconds(_Exc({})) is None
    import random

    rng = random.Random(0)
    delays = [backoff_delay(k, 0.5, 4.0, rng) for k in range(8) for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert max(backoff_delay(0, 0.5, 4.0, rng) for _ in range(50)) <= 0.5  # full jitter, growing window
    assert max(backoff_delay(6, 0.5, 4.0, rng) for _ in range(200)) > 2.0


def test_rate_limiter_token_bucket():
    now = [0.0]
    rl = RateLimiter(requests_per_minute=60, burst=3, clock=lambda: now[0])
    assert [rl.reserve() for _ in range(3)] == [0, 0, 0]
    assert rl.reserve() == pytest.approx(1.0)
    assert rl.reserve() == pytest.approx(2.0)
    now[0] = 10.0  # refilled to the burst, not beyond
    assert [round(rl.reserve(), 6) for _ in range(4)] == [0, 0, 0, 1.0]
    rl.pause_until(20.0)
    assert rl.reserve() == pytest.approx(10.0)
    assert RateLimiter(None).reserve() == 0


def test_budget_reserves_against_largest_cost():
    b = Budget(0.0101, Prices(1.0, 2.0))  # 1000 in + 500 out = 0.002 USD per request
    assert b.reserve()
    assert b.settle(1000, 500) == pytest.approx(0.002)
    granted = 0
    while b.reserve():  # nothing settles: each grant reserves 0.002
        granted += 1
    assert granted == 4 and b.exhausted  # 0.002 spent + 4 in flight = 0.010 <= 0.0101
    assert Budget(None, Prices()).reserve()


# ----------------------------------------------------------------------------- ledger


def test_ledger_repairs_torn_tail_drops_duplicates_and_locks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    a = {"key": "a.png", "dense_caption": "x", "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.5}
    (out / "captions.jsonl").write_text(json.dumps(a) + "\n" + json.dumps(a) + "\n" + '{"key": "b.png", "den')
    (out / "failed.jsonl").write_text(json.dumps({"key": "c.png", "kind": "request", "retryable": True,
                                                  "cost_usd": 0.25, "prompt_tokens": 4}) + "\n")
    with Ledger(out) as led:
        assert led.is_done("a.png") and not led.is_done("b.png")
        assert led.spent()["cost_usd"] == pytest.approx(0.75)
        with pytest.raises(LedgerBusy):
            Ledger(out)
        assert not led.record_done({"key": "a.png", "dense_caption": "again"})  # accepted once only
        assert led.record_done({"key": "c.png", "dense_caption": "y", "prompt_tokens": 1, "cost_usd": 0.1})
        assert not led.record_failed({"key": "c.png", "kind": "refusal"})
    assert [r["key"] for r in caption_lines(out)] == ["a.png", "c.png"]
    c = caption_lines(out)[1]
    assert c["prompt_tokens"] == 5 and c["cost_usd"] == pytest.approx(0.35)  # carries the failure's usage
    assert load_failures(out) == [] and (out / "failed.jsonl").read_text() == ""  # compacted
    Ledger(out).close()  # the lock was released


# ----------------------------------------------------------------------------- end to end, faults


def test_faults_every_valid_image_gets_exactly_one_caption(tmp_path):
    src = tmp_path / "images"
    valid = make_images(src, [f"a{i:02d}.png" for i in range(8)] + [f"sub/b{i:02d}.jpg" for i in range(6)])
    _picture(20, (900, 300)).save(src / "wide.png")
    valid.append("wide.png")
    corrupt = add_corrupt(src)
    plan = {
        "a00.png": ["500", "503", "ok"],
        "a01.png": ["429", "ok"],
        "a02.png": ["timeout", "ok"],
        "a03.png": ["empty", "ok"],
        "a04.png": ["refusal", "ok"],
        "a05.png": ["malformed", "ok"],
        "a06.png": ["short", "fenced"],
        "a07.png": ["length", "nousage"],
        "sub/b00.jpg": ["refusal"] * 4,  # refused every time: fails for good
        "sub/b01.jpg": ["500"] * 4,  # server down for it: a retryable failure
        "sub/b02.jpg": ["400"],  # rejected: fails for good at once
    }
    out = tmp_path / "out"
    with fake_openai({item_id(k): v for k, v in plan.items()}, retry_after=0.3, hang_s=3.0,
                     inspect_images=True) as server:
        s = run(src, out, server, concurrency=4, max_attempts=4, timeout=0.6, max_side=256)

        captions = caption_lines(out)
        keys = [c["key"] for c in captions]
        failed_for_good = {"sub/b00.jpg", "sub/b02.jpg"}
        assert sorted(keys) == sorted(set(valid) - failed_for_good - {"sub/b01.jpg"})
        assert len(keys) == len(set(keys))
        for c in captions:  # the caption of the right image, all fields present
            assert item_id(c["key"]) in c["dense_caption"]
            assert set(c) >= {"key", "source", "dense_caption", "short_caption", "width", "height", "model",
                              "prompt_tokens", "completion_tokens"}
            assert server.ok_count(item_id(c["key"])) == 1
            assert c["model"] == "fake-vlm" and Path(c["source"]).is_file()
        by_key = {c["key"]: c for c in captions}
        assert (by_key["wide.png"]["width"], by_key["wide.png"]["height"]) == (900, 300)
        assert max(server.served(item_id("wide.png"))[0].sent_size) == 256
        assert by_key["a00.png"]["attempts"] == 3 and by_key["a00.png"]["prompt_tokens"] == 100
        assert by_key["a04.png"]["prompt_tokens"] == 200  # the refused answer was paid for too

        failures = {f["key"]: f for f in load_failures(out)}
        assert set(failures) == set(corrupt) | failed_for_good | {"sub/b01.jpg"}
        for k in corrupt:
            assert failures[k]["kind"] == "unreadable" and failures[k]["reason"].startswith("unreadable image:")
            assert server.count(item_id(k)) == 0
        assert failures["sub/b00.jpg"]["kind"] == "refusal" and "after 4 tries" in failures["sub/b00.jpg"]["reason"]
        assert failures["sub/b02.jpg"]["reason"].startswith("HTTP 400") and not failures["sub/b02.jpg"]["retryable"]
        assert failures["sub/b01.jpg"]["retryable"] and "HTTP 500" in failures["sub/b01.jpg"]["reason"]
        assert server.count(item_id("sub/b00.jpg")) == 4 and server.count(item_id("sub/b02.jpg")) == 1

        first, second = server.served(item_id("a01.png"))[:2]
        assert second.t - first.t >= 0.3  # Retry-After honoured
        assert s["done"] == len(valid) - 3 and s["failed"] == 5 and s["failed_retryable"] == 1
        assert s["remaining"] == 1 and s["exit_code"] == 3
        assert json.loads((out / "summary.json").read_text())["done"] == s["done"]

        # Rerun: only the retryable failure is tried again (its plan is used up: it succeeds now).
        n_before = len(server.requests)
        s2 = run(src, out, server, concurrency=4, max_attempts=4, timeout=0.6, max_side=256)
        assert [r.item for r in server.requests[n_before:]] == [item_id("sub/b01.jpg")]
        assert s2["exit_code"] == 0 and s2["run"]["done"] == 1 and s2["skipped"] == len(valid) + len(corrupt) - 1
        assert caption_lines(out)[-1]["key"] == "sub/b01.jpg" and caption_lines(out)[-1]["attempts"] == 5
        assert "sub/b01.jpg" not in {f["key"] for f in load_failures(out)}

        # --retry-failed: the refused and rejected images get another chance; corrupt ones fail again.
        s3 = run(src, out, server, concurrency=4, max_attempts=4, timeout=0.6, retry_failed=True)
        assert s3["done"] == len(valid) and s3["failed"] == len(corrupt)
        assert Counter(c["key"] for c in caption_lines(out)) == Counter(valid)


def test_fatal_http_error_stops_the_job(tmp_path):
    src = tmp_path / "images"
    make_images(src, [f"x{i}.png" for i in range(6)])
    with fake_openai(default="401") as server:
        s = run(src, tmp_path / "out", server, concurrency=2)
    assert s["stopped"] == "fatal" and "HTTP 401" in s["fatal_error"] and s["exit_code"] == 2
    assert s["failed"] == 0 and len(server.requests) <= 2  # stopped at the first answers; nothing failed


# ----------------------------------------------------------------------------- SIGKILL and resume


def test_sigkill_mid_run_then_restart_loses_and_repeats_nothing(tmp_path):
    src = tmp_path / "images"
    names = make_images(src, [f"img{i:02d}.png" for i in range(30)], size=(32, 32))
    out = tmp_path / "out"
    plan = {item_id("img03.png"): ["500", "ok"], item_id("img17.png"): ["refusal", "ok"]}
    with fake_openai(plan, latency=0.15) as server:
        cmd = [sys.executable, "-m", "lens_jax.data.caption", "--images", str(src), "--out", str(out),
               "--model", "fake-vlm", "--base-url", server.base_url, "--concurrency", "3", "--backoff", "0.01",
               "--max-backoff", "0.05", "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(tmp_path / "log1", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                p = out / "captions.jsonl"
                if p.exists() and p.read_bytes().count(b"\n") >= 8:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, (tmp_path / "log1").read_text()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finished = {c["key"] for c in load_captions(out)}
        assert 8 <= len(finished) < len(names)
        served_at_kill = len(server.requests)

        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        summary = json.loads(r.stdout)
        captions = caption_lines(out)
        keys = [c["key"] for c in captions]
        assert sorted(keys) == sorted(names) and len(keys) == len(set(keys))
        for k in finished:  # no request at all after the restart for what was finished before the kill
            assert server.ok_count(item_id(k)) == 1
            assert all(s.n < served_at_kill for s in server.served(item_id(k)))
        assert summary["skipped"] == len(finished) and summary["run"]["done"] == len(names) - len(finished)
        assert summary["done"] == len(names) and load_failures(out) == []


# ----------------------------------------------------------------------------- budget and rate limit


def test_max_cost_stops_before_exceeding_and_resumes(tmp_path):
    src = tmp_path / "images"
    make_images(src, [f"c{i}.png" for i in range(10)])
    out = tmp_path / "out"
    prices = dict(price_in=1.0, price_out=2.0)  # 1000 in + 500 out tokens = 0.002 USD per request
    with fake_openai(prompt_tokens=1000, completion_tokens=500, latency=0.02) as server:
        s = run(src, out, server, concurrency=3, max_cost=0.0101, **prices)
        assert s["stopped"] == "max_cost" and s["exit_code"] == 3
        assert s["done"] == 5 and len(server.requests) == 5
        assert s["total"]["cost_usd"] == pytest.approx(0.010) and s["total"]["cost_usd"] <= 0.0101
        assert s["run"]["prompt_tokens"] == 5000 and s["run"]["completion_tokens"] == 2500
        s = run(src, out, server, concurrency=3, max_cost=0.0101, **prices)  # the budget covers the directory
        assert s["run"]["requests"] == 0 and s["stopped"] == "max_cost"
        s = run(src, out, server, concurrency=3, max_cost=0.0161, **prices)
        assert s["done"] == 8 and s["total"]["cost_usd"] == pytest.approx(0.016)
        s = run(src, out, server, concurrency=3, **prices)
        assert s["done"] == 10 and s["exit_code"] == 0 and len(server.requests) == 10
    with pytest.raises(ValueError, match="price"):
        run(src, out, server, max_cost=1.0)


def test_rate_limit_bounds_requests_per_second(tmp_path):
    src = tmp_path / "images"
    make_images(src, [f"r{i}.png" for i in range(10)])
    with fake_openai() as server:
        s = run(src, tmp_path / "out", server, concurrency=8, requests_per_minute=600)  # 10/s, burst 1
        t = sorted(r.t for r in server.requests)
    assert s["done"] == 10
    assert t[-1] - t[0] >= 0.8  # 10 requests at 10/s: the last one >= 0.9 s after the first's slot
    for i in range(len(t)):  # never more than 1 + 10/s * window in any window
        for j in range(i + 1, len(t)):
            assert j - i <= 1 + 10 * (t[j] - t[i]) + 1, (i, j, t[j] - t[i])
    assert s["run"]["requests_per_s"] <= 11.5


# ----------------------------------------------------------------------------- other sources


def test_list_file_source(tmp_path):
    imgs = tmp_path / "pool"
    make_images(imgs, ["one.png", "two.png", "deep/three.jpg"])
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([
        "# images to caption", "", "pool/one.png", str(imgs / "two.png"), "pool/one.png",
        json.dumps({"path": "pool/deep/three.jpg", "key": "three"}), "pool/missing.png"]) + "\n")
    with fake_openai() as server:
        s = run(lst, tmp_path / "out", server, concurrency=2)
    keys = sorted(c["key"] for c in caption_lines(tmp_path / "out"))
    assert keys == sorted(["pool/one.png", str(imgs / "two.png"), "three"])
    (missing,) = load_failures(tmp_path / "out")
    assert missing["key"] == "pool/missing.png" and "FileNotFoundError" in missing["reason"]
    assert s["images"] == 4 and s["done"] == 3


def test_tfds_source(tmp_path):
    from lens_jax.data.tfds_shapes import write_tfds_dataset

    def rec(i, image=None):
        return {"image": png_bytes(i) if image is None else image, "width": 32, "height": 24, "index": i}

    bdir = write_tfds_dataset(tmp_path / "tfds", {"train": [rec(0), rec(1), rec(2, b"corrupt bytes"), rec(3)],
                                                  "eval": [rec(4), rec(5)]})
    with fake_openai() as server:
        s = run(bdir, tmp_path / "out", server, concurrency=3)
        s_train = run(bdir, tmp_path / "out_train", server, concurrency=2, splits=("eval",))
    captions = caption_lines(tmp_path / "out")
    assert sorted(c["key"] for c in captions) == ["eval/0", "eval/1", "train/0", "train/1", "train/3"]
    assert all((c["width"], c["height"]) == (32, 24) and c["source"].startswith("tfds:") for c in captions)
    (bad,) = load_failures(tmp_path / "out")
    assert bad["key"] == "train/2" and bad["kind"] == "unreadable"
    assert s["images"] == 6 and s["exit_code"] == 0
    assert sorted(c["key"] for c in caption_lines(tmp_path / "out_train")) == ["eval/0", "eval/1"]
    assert s_train["images"] == 2


# ----------------------------------------------------------------------------- benchmark


def test_bench_caption_reports_throughput():
    from lens_jax.bench.caption import bench_caption

    r = bench_caption(4, 12, 0.02, image_size=64, server="thread")
    assert r["done"] == 12 and r["requests"] == 12 and r["concurrency"] == 4
    assert 0 < r["requests_per_s"] <= r["ideal_requests_per_s"] * 1.05
    assert r["images_per_s"] == r["requests_per_s"]
