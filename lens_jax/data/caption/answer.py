"""Reading one model answer: the dense and the short caption, parsed leniently, then validated.

The instruction asks for ``{"dense_caption": "...", "short_caption": "..."}``. Models wrap that in
markdown fences, put a sentence before it, leave a trailing comma, use single quotes or other key
names, or ignore the format and write labelled text. :func:`parse_answer` accepts all of these and
returns the two captions (either may be empty); :func:`check_answer` then says whether the pair is
acceptable: both present, no refusal, dense and short word counts within bounds. A rejected answer
is retried by the caller; its ``kind`` ("empty", "refusal", "invalid") names the failure.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re

_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"```[a-zA-Z0-9_-]*\s*(.*?)```", re.DOTALL)
DENSE_KEYS = ("dense_caption", "dense", "densecaption", "detailed_caption", "long_caption", "description",
              "caption")
SHORT_KEYS = ("short_caption", "short", "shortcaption", "brief_caption", "summary", "title")

# A refusal opens the answer (a caption that quotes a sign saying "Sorry" does not start with it) or is
# one of the stock phrases anywhere.
_REFUSAL_START = re.compile(
    r"^\W*(?:(?:i\s*(?:'|’)?\s*m|i am)\s+(?:sorry|afraid|unable|not able)|sorry\b|i apologi[sz]e"
    r"|i\s+(?:can\s*(?:'|’)?\s*t|cannot|can not|won\s*(?:'|’)?\s*t|will not|am not able to|must decline)"
    r"|unfortunately,?\s+i\b|as an ai\b)",
    re.IGNORECASE)
_REFUSAL_ANY = re.compile(
    r"as an ai (?:language )?model|i(?:'|’)?m (?:sorry|afraid),? but i|"
    r"i (?:can(?:'|’)?t|cannot|am unable to|'m unable to) (?:help|assist|comply|provide (?:a|that)|describe (?:this|that|the))"
    r"|(?:can(?:'|’)?t|cannot|unable to) (?:help|assist) with (?:this|that) (?:request|image)",
    re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Word-count bounds for an accepted answer (inclusive)."""

    min_words: int = 15
    max_words: int = 400
    short_min_words: int = 2
    short_max_words: int = 40


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    dense: str = ""
    short: str = ""
    kind: str = ""  # "" when ok; else "empty", "refusal" or "invalid"
    reason: str = ""


def strip_answer(text: str | None) -> str:
    """Without reasoning ``<think>`` blocks and surrounding whitespace."""
    return _THINK_RE.sub("", text or "").strip()


def _clean(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    text = " ".join(str(value).split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def _from_mapping(obj) -> tuple[str, str] | None:
    if not isinstance(obj, dict):
        return None
    norm = {re.sub(r"[\s-]+", "_", str(k).strip().lower()): v for k, v in obj.items()}
    dense = next((norm[k] for k in DENSE_KEYS if k in norm), None)
    short = next((norm[k] for k in SHORT_KEYS if k in norm), None)
    if dense is None and short is None:
        for v in norm.values():  # {"captions": {...}} and similar nesting
            got = _from_mapping(v)
            if got:
                return got
        return None
    return _clean(dense), _clean(short)


def _balanced_objects(text: str):
    """Substrings that are brace-balanced ``{...}`` (outside of strings), first one first."""
    start = text.find("{")
    while start != -1:
        depth, in_str, esc, quote = 0, False, False, ""
        for i in range(start, len(text)):
            c = text[i]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == quote:
                    in_str = False
            elif c in "\"'":
                in_str, quote = True, c
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    yield text[start:i + 1]
                    break
        start = text.find("{", start + 1)


def _loads(candidate: str):
    for attempt in (candidate, re.sub(r",\s*([}\]])", r"\1", candidate)):  # trailing commas
        try:
            return json.loads(attempt, strict=False)  # strict=False: raw newlines inside strings
        except ValueError:
            pass
        try:  # single quotes, Python literals
            return ast.literal_eval(attempt)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    return None


def _field_regex(text: str, keys) -> str | None:
    for key in keys:
        m = re.search(r"[\"']?" + key + r"[\"']?\s*[:=]\s*\"((?:[^\"\\]|\\.)*)\"", text, re.IGNORECASE)
        if m:
            try:
                return json.loads('"' + m.group(1) + '"', strict=False)
            except ValueError:
                return m.group(1)
    return None


def _labelled(text: str) -> tuple[str, str] | None:
    """``Dense caption: ...`` / ``Short caption: ...`` lines (markdown bold and bullets allowed)."""
    label = r"^[\s*#>-]*\**\s*({})\s*\**\s*[:\-–]\s*\**"
    dense_l = label.format(r"dense[ _]caption|dense|detailed caption|long caption|description")
    short_l = label.format(r"short[ _]caption|short|brief caption|summary")
    dm = re.search(dense_l, text, re.IGNORECASE | re.MULTILINE)
    sm = re.search(short_l, text, re.IGNORECASE | re.MULTILINE)
    if not dm and not sm:
        return None
    spans = sorted([(m.start(), m.end(), name) for m, name in ((dm, "d"), (sm, "s")) if m])
    out = {"d": "", "s": ""}
    for i, (_, end, name) in enumerate(spans):
        stop = spans[i + 1][0] if i + 1 < len(spans) else len(text)
        out[name] = _clean(text[end:stop].strip().strip("*").strip())
    return out["d"], out["s"]


def parse_answer(text: str | None) -> tuple[str, str]:
    """(dense, short) from one answer; empty strings for what cannot be found."""
    text = strip_answer(text)
    if not text:
        return "", ""
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    for cand in candidates:
        cand = cand.strip()
        for obj_text in ([cand] if cand.startswith("{") else []) + list(_balanced_objects(cand)):
            got = _from_mapping(_loads(obj_text))
            if got:
                return got
    dense = _field_regex(text, DENSE_KEYS[:3])
    short = _field_regex(text, SHORT_KEYS[:3])
    if dense is not None or short is not None:
        return _clean(dense), _clean(short)
    got = _labelled(text)
    if got:
        return got
    if "{" in text or "[" in text[:1]:
        return "", ""  # JSON that could not be read: not a caption
    return _clean(text), ""  # plain prose: a dense caption without a short one


def is_refusal(text: str) -> bool:
    text = strip_answer(text)
    return bool(_REFUSAL_START.search(text[:200]) or _REFUSAL_ANY.search(text))


def word_count(text: str) -> int:
    return len(text.split())


def check_answer(text: str | None, bounds: Bounds = Bounds()) -> Verdict:
    """Parses and validates one answer; ``Verdict.ok`` with both captions, or the failure's kind and reason."""
    raw = strip_answer(text)
    if not raw:
        return Verdict(False, kind="empty", reason="empty answer")
    dense, short = parse_answer(raw)
    if is_refusal(raw) or (dense and is_refusal(dense)) or (short and is_refusal(short)):
        return Verdict(False, dense, short, "refusal", f"refusal: {raw[:120]!r}")
    if not dense:
        return Verdict(False, dense, short, "invalid", f"no dense caption in the answer: {raw[:120]!r}")
    if not short:
        return Verdict(False, dense, short, "invalid", f"no short caption in the answer: {raw[:120]!r}")
    n = word_count(dense)
    if not bounds.min_words <= n <= bounds.max_words:
        return Verdict(False, dense, short, "invalid",
                       f"dense caption has {n} words, outside [{bounds.min_words}, {bounds.max_words}]")
    n = word_count(short)
    if not bounds.short_min_words <= n <= bounds.short_max_words:
        return Verdict(False, dense, short, "invalid",
                       f"short caption has {n} words, outside [{bounds.short_min_words}, {bounds.short_max_words}]")
    return Verdict(True, dense, short)
