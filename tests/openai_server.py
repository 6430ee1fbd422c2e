"""A fault-injecting OpenAI-compatible chat server on 127.0.0.1, for tests.

The implementation lives in the library (:mod:`lens_jax.data.caption.fake_server`) because the
captioner benchmark uses it too; this module is the tests' entry point to it, plus a fixture helper.

    from openai_server import FakeOpenAI, fake_openai   # with tests/ on sys.path

    with FakeOpenAI({item_id("a.png"): ["500", "429", "ok"]}, retry_after=0.2) as server:
        ... base_url=server.base_url ...
        server.ok_count(item_id("a.png")), server.served(), server.requests

Faults (per image, in request order, then ``default``): ok, 500, 503, 429 (+ Retry-After), 400, 401,
404, timeout (answers after ``hang_s``), empty, refusal, malformed, short, fenced, length, nousage;
``script(body, item, attempt, n) -> fault`` decides per request instead. Images are told apart by
the ``X-Caption-Item`` header (``lens_jax.data.caption.request.item_id(key)``), text-only requests
by a hash of their messages.
"""

from __future__ import annotations

import contextlib

from lens_jax.data.caption.fake_server import FAULTS, REFUSAL, VALID, FakeOpenAI, Served, answer_for, dense_text
from lens_jax.data.caption.request import ITEM_HEADER, item_id

__all__ = ["FAULTS", "FakeOpenAI", "ITEM_HEADER", "REFUSAL", "Served", "VALID", "answer_for", "dense_text",
           "fake_openai", "item_id"]


@contextlib.contextmanager
def fake_openai(*args, **kwargs):
    """A started :class:`FakeOpenAI`, stopped on exit (use from a pytest fixture)."""
    server = FakeOpenAI(*args, **kwargs)
    try:
        yield server
    finally:
        server.stop()
