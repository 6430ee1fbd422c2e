"""Prompt reasoner CLI: rewrite one prompt, or improve the reasoner's system prompt without training.

    python -m lens_jax.reasoner rewrite --model M [--base-url URL] [--system-prompt-file F] PROMPT
    python -m lens_jax.reasoner optimize --model M [--base-url URL] --prompts FILE --rounds N \\
        --out DIR [--system-prompt-file F] [--judge-model M2]

``optimize`` is a training-free outer loop. Each round: rewrite every prompt of the set with the
current system prompt; a judge (same endpoint, ``--judge-model`` or ``--model``) scores each
rewrite against its short prompt, answering JSON {"score": 0..1, "reason": "..."}; the mean is the
round's score; the lowest-scoring cases go to the model with a meta-prompt that asks it to
summarise the failures and propose an improved system prompt, which the next round evaluates.
The best-scoring system prompt so far is kept in DIR/best_system_prompt.txt; every round is
appended to DIR/rounds.jsonl, and rerunning with the same --out resumes after the last recorded
round (``--rounds`` is the total count, so a rerun with the same N does nothing).

The prompt set is one prompt per line (blank lines and lines starting with '#' are skipped; a line
that is a JSON object uses its "prompt" field).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lens_jax.sample.reasoner import (
    ReasonerError,
    chat_completion,
    load_system_prompt,
    make_client,
    rewrite_prompt,
    rewrite_with_system_prompt,
)

JUDGE_SYSTEM_PROMPT = """You grade rewrites of short text-to-image prompts.

A rewriter turned a SHORT PROMPT into a DENSE DESCRIPTION for an image generator. Score the
description from 0 to 1:
- faithfulness (most important): every object, attribute, count, word of text and relation in the
  short prompt is kept and nothing contradicts it; a dropped or changed element caps the score at 0.3;
- density: concrete colour, shape, size, texture, exact quantities, quoted text, spatial
  relationships and background, without padding or metaphors;
- form: one paragraph of about 80 to 120 words, only the description (no preamble, lists or notes).

Answer with only a JSON object: {"score": <number between 0 and 1>, "reason": "<one sentence>"}"""

META_PROMPT = """You improve the system prompt of a prompt rewriter for a text-to-image model.

The rewriter receives a short prompt and must answer with a dense, faithful visual description of
about 80 to 120 words (colour, shape, size, texture, quantity, text, spatial relationships,
background), nothing else. A judge scored its rewrites from 0 to 1; the mean score of the current
system prompt is {mean:.3f}.

CURRENT SYSTEM PROMPT:
<<<
{system_prompt}
>>>

LOWEST-SCORING CASES:
{cases}

First summarise, in a few sentences, what the failures have in common. Then write a complete,
improved system prompt that fixes them while keeping what works. Answer exactly in this format:
<summary>the failure summary</summary>
<system_prompt>the full improved system prompt</system_prompt>"""


# ----------------------------------------------------------------------------- parsing helpers


def read_prompts(path: str | os.PathLike) -> list[str]:
    prompts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                if isinstance(obj, dict) and str(obj.get("prompt", "")).strip():
                    prompts.append(str(obj["prompt"]).strip())
                    continue
            except json.JSONDecodeError:
                pass
        prompts.append(line)
    if not prompts:
        raise SystemExit(f"no prompts in {path}")
    return prompts


def _normalise_score(x: float) -> float | None:
    if not math.isfinite(x) or x < 0:
        return None
    if x > 1:  # a judge that answered on a 10- or 100-point scale
        x = x / 10 if x <= 10 else x / 100 if x <= 100 else None
    return None if x is None else min(1.0, max(0.0, x))


def parse_judge(text: str) -> tuple[float | None, str]:
    """(score in [0, 1] or None, reason) from a judge answer: JSON, fenced JSON, or loose text."""
    text = (text or "").strip()
    fenced = re.sub(r"^```(?:json)?\s*|\s*```$", "", text, flags=re.IGNORECASE).strip()
    candidates = [fenced] + re.findall(r"\{.*?\}", text, flags=re.DOTALL) + re.findall(r"\{.*\}", text, flags=re.DOTALL)
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict) and "score" in obj:
            try:
                score = _normalise_score(float(obj["score"]))
            except (TypeError, ValueError):
                continue
            if score is not None:
                return score, str(obj.get("reason", "")).strip()
    m = re.search(r"score[\"']?\s*[:=]\s*([0-9]*\.?[0-9]+)", text, flags=re.IGNORECASE)
    if m is None:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:/\s*(?:1|10|100))?\s*", text)
    if m is not None:
        score = _normalise_score(float(m.group(1)))
        if score is not None:
            r = re.search(r"reason[\"']?\s*[:=]\s*[\"']?(.*?)[\"']?\s*[,}]?\s*$", text, flags=re.IGNORECASE | re.DOTALL)
            return score, (r.group(1).strip() if r else text[:300])
    return None, f"unparseable judge answer: {text[:200]!r}"


def parse_improvement(text: str) -> tuple[str, str]:
    """(failure summary, proposed system prompt) from the meta-prompt answer ('' when missing)."""
    text = (text or "").strip()
    s = re.search(r"<summary>(.*?)</summary>", text, flags=re.DOTALL | re.IGNORECASE)
    p = re.search(r"<system_prompt>(.*?)(?:</system_prompt>|$)", text, flags=re.DOTALL | re.IGNORECASE)
    summary = s.group(1).strip() if s else ""
    if p:
        proposal = p.group(1).strip()
    elif s:  # a summary but no tagged prompt: take what follows the summary
        proposal = text[s.end():].strip()
    else:  # no tags at all: the whole answer is the new prompt
        proposal = text
    proposal = re.sub(r"^(?:<<<|```\w*)\s*|\s*(?:>>>|```)$", "", proposal).strip()
    return summary, proposal


# ----------------------------------------------------------------------------- the optimize loop


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_rounds(path: Path) -> list[dict]:
    """Records of rounds.jsonl, dropping a torn last line (a run killed mid-write)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: skipping an unreadable line of {path}", file=sys.stderr)
    return records


def _score_one(prompt: str, system_prompt: str, *, model: str, judge_model: str, call_kwargs: dict) -> dict:
    try:
        rewrite = rewrite_with_system_prompt(prompt, system_prompt, model=model, **call_kwargs)
    except ReasonerError as exc:
        return {"prompt": prompt, "rewrite": None, "score": 0.0, "reason": f"rewrite failed: {exc.reason}"}
    judge_messages = [
        {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
        {"role": "user", "content": f"SHORT PROMPT:\n{prompt}\n\nDENSE DESCRIPTION:\n{rewrite}"},
    ]
    try:
        score, reason = parse_judge(chat_completion(judge_messages, model=judge_model, **call_kwargs))
    except ReasonerError as exc:
        score, reason = None, f"judge failed: {exc.reason}"
    return {"prompt": prompt, "rewrite": rewrite, "score": score, "reason": reason}


def _format_cases(cases: list[dict]) -> str:
    out = []
    for i, c in enumerate(cases, 1):
        out.append(
            f"{i}. score {c['score'] if c['score'] is not None else 'n/a'}\n"
            f"   short prompt: {c['prompt']}\n   rewrite: {c['rewrite'] if c['rewrite'] is not None else '(failed)'}\n"
            f"   judge: {c['reason']}"
        )
    return "\n".join(out)


def optimize(
    *,
    model: str,
    prompts: list[str],
    rounds: int,
    out: str | os.PathLike,
    base_url: str | None = None,
    system_prompt_file: str | None = None,
    judge_model: str | None = None,
    num_failures: int = 5,
    workers: int = 4,
    timeout: float = 60,
    retries: int = 3,
    api_key: str | None = None,
    progress: bool | None = None,
    backoff: float = 0.5,
) -> list[dict]:
    """Run rounds up to ``rounds`` in total (resuming from DIR/rounds.jsonl); returns all records."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rounds_path, best_path = out / "rounds.jsonl", out / "best_system_prompt.txt"
    judge_model = judge_model or model
    prompts_sha = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]

    records = load_rounds(rounds_path)
    if records:
        if records[-1].get("prompts_sha") != prompts_sha:
            print("warning: the prompt set differs from the one recorded in rounds.jsonl; scores may not compare",
                  file=sys.stderr)
        current = records[-1].get("next_system_prompt") or records[-1]["system_prompt"]
        best = max(records, key=lambda r: r["mean_score"])
        best_score, best_prompt, best_round = best["mean_score"], best["system_prompt"], best["round"]
    else:
        current = load_system_prompt(system_prompt_file)
        best_score, best_prompt, best_round = -1.0, current, -1
    start = len(records)
    if start >= rounds:
        print(f"{rounds_path}: {start} round(s) already recorded (>= --rounds {rounds}); nothing to do", file=sys.stderr)
        if best_round >= 0 and not best_path.exists():
            _atomic_write(best_path, best_prompt + "\n")
        return records

    client = make_client(base_url, api_key, timeout)
    call_kwargs = dict(client=client, timeout=timeout, retries=retries, backoff=backoff)
    bar = tqdm(total=(rounds - start) * len(prompts), desc="optimize", unit="prompt", disable=None if progress is None else not progress)
    try:
        for rnd in range(start, rounds):
            bar.set_description(f"round {rnd + 1}/{rounds}")
            t0 = time.time()

            def work(p, sp=current):
                res = _score_one(p, sp, model=model, judge_model=judge_model, call_kwargs=call_kwargs)
                bar.update(1)
                return res

            with ThreadPoolExecutor(max(1, workers)) as pool:
                scores = list(pool.map(work, prompts))
            valid = [s["score"] for s in scores if s["score"] is not None]
            mean = sum(valid) / len(valid) if valid else 0.0
            # Failures: unscored cases, then the lowest scores.
            ranked = sorted(scores, key=lambda s: -1.0 if s["score"] is None else s["score"])
            failures = ranked[: max(1, num_failures)]

            improved = current
            meta = META_PROMPT.format(mean=mean, system_prompt=current, cases=_format_cases(failures))
            try:
                summary, proposal = parse_improvement(
                    chat_completion([{"role": "user", "content": meta}], model=model, **call_kwargs))
                if proposal:
                    improved = proposal
                else:
                    summary = summary or "(no system prompt proposed; keeping the current one)"
            except ReasonerError as exc:
                summary = f"improvement call failed: {exc.reason}; keeping the current system prompt"

            if mean > best_score:
                best_score, best_prompt, best_round = mean, current, rnd
                _atomic_write(best_path, best_prompt + "\n")
            elif not best_path.exists():
                _atomic_write(best_path, best_prompt + "\n")
            record = {
                "round": rnd,
                "mean_score": mean,
                "num_scored": len(valid),
                "scores": scores,
                "system_prompt": current,
                "failure_summary": summary,
                "next_system_prompt": improved,
                "best_round": best_round,
                "best_score": best_score,
                "model": model,
                "judge_model": judge_model,
                "prompts_sha": prompts_sha,
                "seconds": round(time.time() - t0, 3),
            }
            with rounds_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            records.append(record)
            bar.write(f"round {rnd}: mean score {mean:.3f} (best {best_score:.3f}, round {best_round})")
            current = improved
    finally:
        bar.close()
        client.close()
    return records


# ----------------------------------------------------------------------------- CLI


def _add_endpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name at the endpoint")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                   "(default: the OpenAI API); the key is $OPENAI_API_KEY or 'EMPTY'")
    p.add_argument("--system-prompt-file", default=None, help="system prompt file (default: the packaged one)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=3, help="retries after a failed request")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lens_jax.reasoner", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rw = sub.add_parser("rewrite", help="rewrite one prompt into a dense description and print it")
    _add_endpoint_args(rw)
    rw.add_argument("prompt", nargs="+", help="the short prompt")
    op = sub.add_parser("optimize", help="improve the system prompt over rounds (training-free)")
    _add_endpoint_args(op)
    op.add_argument("--prompts", required=True, help="prompt set: one prompt per line")
    op.add_argument("--rounds", type=int, required=True, help="total rounds (a rerun resumes after the last recorded)")
    op.add_argument("--out", required=True, help="output directory (rounds.jsonl, best_system_prompt.txt)")
    op.add_argument("--judge-model", default=None, help="judge model (default: --model)")
    op.add_argument("--num-failures", type=int, default=5, help="lowest-scoring cases shown to the model")
    op.add_argument("--workers", type=int, default=4, help="prompts scored concurrently")
    op.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "rewrite":
        prompt = " ".join(args.prompt)
        print(rewrite_prompt(prompt, model=args.model, base_url=args.base_url,
                             system_prompt_file=args.system_prompt_file, timeout=args.timeout, retries=args.retries))
        return 0
    records = optimize(
        model=args.model, prompts=read_prompts(args.prompts), rounds=args.rounds, out=args.out,
        base_url=args.base_url, system_prompt_file=args.system_prompt_file, judge_model=args.judge_model,
        num_failures=args.num_failures, workers=args.workers, timeout=args.timeout, retries=args.retries,
        progress=False if args.no_progress else None,
    )
    if records:
        best = max(records, key=lambda r: r["mean_score"])
        print(f"best system prompt: round {best['round']}, mean score {best['mean_score']:.3f} "
              f"-> {Path(args.out) / 'best_system_prompt.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
