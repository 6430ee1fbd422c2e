"""GenEval's pass/fail rules on the programmatic detector's detections, and the summary.

The rules follow GenEval's ``evaluate_images.py``:

* Detections below :data:`DETECTION_THRESHOLD` are dropped (GenEval: 0.3 for its Mask2Former, and a
  stricter 0.9 for counting prompts; here :data:`COUNTING_THRESHOLD`, on the detector's template-fit
  score). Detections are grouped by shape (GenEval's class) and sorted by score.
* For every ``include`` entry ``{class, count, color?, position?}``: the ``count`` best detections of
  the class must exist; with ``color`` they must all have that colour; with ``position: [relation,
  g]`` each of them must be in that relation to the best detection(s) of include entry ``g``, by
  GenEval's ``relative_position`` (box centres, the offset reduced by 0.1 of the two box sizes per
  axis, normalised coordinates).
* For every ``exclude`` entry ``{class, count}``: fewer than ``count`` detections of the class (so a
  counting prompt for N fails on N+1 or more).

Per task: single_object (the shape is there), two_objects (both shapes), counting (exactly N),
colors (the shape, in the colour), position (both shapes, the relation holds), color_attr (each shape
in its own colour). The score is the mean over the task means (GenEval's overall score).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lens_jax.eval import detector as detector_lib
from lens_jax.eval.tasks import POSITION_THRESHOLD, TASKS, EvalItem, relative_position, task_notes, unavailable_tasks

DETECTION_THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.5


def _by_class(dets: Sequence[detector_lib.Detection], threshold: float) -> dict[str, list[detector_lib.Detection]]:
    out: dict[str, list[detector_lib.Detection]] = {}
    for d in sorted(dets, key=lambda d: -d.score):
        if d.score >= threshold:
            out.setdefault(d.shape, []).append(d)
    return out


def check(spec: Mapping[str, Any], detections: Sequence[detector_lib.Detection]) -> tuple[bool, str]:
    """GenEval's ``evaluate`` on one image's detections: (passed, reason; '' when passed)."""
    threshold = COUNTING_THRESHOLD if spec.get("tag") == "counting" else DETECTION_THRESHOLD
    objects = _by_class(detections, threshold)
    correct = True
    reasons: list[str] = []
    matched: list[list[detector_lib.Detection] | None] = []
    for req in spec.get("include", []):
        cls, n = req["class"], int(req["count"])
        found = objects.get(cls, [])[:n]
        ok = True
        if len(found) < n:
            ok = False
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < n:
                    ok = False
                    reasons.append(f"expected {req['color']} {cls}>={n}, found "
                                   f"{colors.count(req['color'])} {req['color']}; and "
                                   + ", ".join(f"{c} {cls}" for c in colors if c != req["color"]))
            if "position" in req and ok:
                rel, g = req["position"][0], int(req["position"][1])
                targets = matched[g] if g < len(matched) else None
                if not targets:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for d in found:
                        for t in targets:
                            got = relative_position(d.box, t.box, POSITION_THRESHOLD)
                            if rel not in got:
                                ok = False
                                reasons.append(f"expected {cls} {rel} target, found "
                                               f"{' and '.join(sorted(got)) or 'no clear relation'}")
                                break
                        if not ok:
                            break
        correct &= ok
        matched.append(found if ok else None)
    for req in spec.get("exclude", []):
        cls, n = req["class"], int(req["count"])
        if len(objects.get(cls, [])) >= n:
            correct = False
            reasons.append(f"expected {cls}<{n}, found {len(objects[cls])}")
    return bool(correct), "; ".join(reasons)


def score_image_detailed(image: np.ndarray, item: EvalItem) -> dict[str, Any]:
    """{"passed", "reason", "detections"} for one generated image of ``item``."""
    dets = detector_lib.detect(image)
    passed, reason = check(item.spec, dets)
    return {"passed": passed, "reason": reason, "detections": [d.to_dict() for d in dets]}


def score_image(image: np.ndarray, item: EvalItem) -> tuple[bool, str]:
    """(passed, reason) of one image for one item under GenEval's rules."""
    r = score_image_detailed(image, item)
    return r["passed"], r["reason"]


def summarize(results: Iterable[Mapping[str, Any]], scene_config=None) -> dict[str, Any]:
    """``{"tasks": {task: mean pass rate}, "overall": mean of the task means, "n": images,
    "n_per_task": {...}, "skipped": {task: reason}, "notes": {task: note}}``.

    ``results`` are dicts with at least ``task`` and ``passed`` (:func:`lens_jax.eval.runner.evaluate`
    gives them). Tasks with no results are listed in ``skipped`` (with the reason when the scene config
    makes them impossible) and left out of ``overall``; ``notes`` says which tasks are outside the scene
    config's training distribution.
    """
    per: dict[str, list[bool]] = {}
    for r in results:
        per.setdefault(r["task"], []).append(bool(r["passed"]))
    order = [t for t in TASKS if t in per] + sorted(t for t in per if t not in TASKS)
    tasks = {t: float(np.mean(per[t])) for t in order}
    impossible = unavailable_tasks(scene_config)
    skipped = {t: impossible.get(t, "no items") for t in TASKS if t not in per}
    return {
        "tasks": tasks,
        "overall": float(np.mean(list(tasks.values()))) if tasks else float("nan"),
        "n": int(sum(len(v) for v in per.values())),
        "n_per_task": {t: len(per[t]) for t in order},
        "skipped": skipped,
        "notes": {t: v for t, v in task_notes(scene_config).items() if t in per},
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A small text table of a summary."""
    lines = [f"{'task':<14} {'score':>6} {'n':>5}"]
    for t, v in summary["tasks"].items():
        lines.append(f"{t:<14} {v:>6.3f} {summary['n_per_task'][t]:>5}")
    lines.append(f"{'overall':<14} {summary['overall']:>6.3f} {summary['n']:>5}")
    for t, why in summary.get("skipped", {}).items():
        lines.append(f"skipped {t}: {why}")
    for t, note in summary.get("notes", {}).items():
        lines.append(f"note {t}: {note}")
    return "\n".join(lines)
