"""python -m lens_jax.budget estimate --config CONFIG --schedule SCHEDULE --hardware a100 [--mfu 0.4]
                                   [--price-per-hour X] [--measured-mfu-from WORKDIR] [--json]
python -m lens_jax.budget compare [--json]
python -m lens_jax.budget ablate-captions [--config configs/caption_ablation.py] [--budget-flops X] [--out DIR]

A thin command line over lens_jax.budget.estimate and lens_jax.budget.published (which the tests call).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from lens_jax.budget.hardware import PEAK_BF16_FLOPS

# Subcommands implemented by a module of their own that parses its own flags: name -> (module, help).
# Adding one is one line here; the module exposes main(argv) -> int | None.
DELEGATED: dict[str, tuple[str, str]] = {
    "ablate-captions": ("lens_jax.budget.ablation",
                        "train one toy on dense / mixed / short captions at equal FLOPs and score each with ShapesEval"),
}


def _estimate(args) -> int:
    from lens_jax.budget.estimate import estimate, format_estimate

    result = estimate(args.config, args.schedule, args.hardware, mfu=args.mfu, price_per_hour=args.price_per_hour,
                      measured_mfu_from=args.measured_mfu_from, warmup_records=args.warmup_records,
                      mfu_basis=args.mfu_basis)
    if args.json:
        if not args.buckets:
            for s in result["stages"]:
                s.pop("buckets")
        print(json.dumps(result, indent=2))
    else:
        print(format_estimate(result, show_buckets=args.buckets))
    return 0


def _compare(args) -> int:
    from lens_jax.budget.published import compare, format_compare

    result = compare(args.config, args.schedule)
    print(json.dumps(result, indent=2) if args.json else format_compare(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lens_jax.budget.published import DEFAULT_CONFIG, DEFAULT_SCHEDULE

    parser = argparse.ArgumentParser(prog="python -m lens_jax.budget", description="Training compute budgets.")
    sub = parser.add_subparsers(dest="command", required=True)

    es = sub.add_parser("estimate", help="FLOPs, device-hours and cost of a config trained on a schedule")
    es.add_argument("--config", required=True, help="a configs/*.py run config (the model)")
    es.add_argument("--schedule", required=True, help="a configs/schedules/*.py schedule")
    es.add_argument("--hardware", required=True, choices=sorted(PEAK_BF16_FLOPS))
    es.add_argument("--mfu", type=float, default=None, help="model-FLOPs utilisation (default 0.4)")
    es.add_argument("--mfu-basis", choices=("all", "dit"), default=None,
                    help="FLOPs the MFU is over: 'all' counted FLOPs (default with --mfu) or 'dit' only, the "
                         "training loop's definition (default with --measured-mfu-from)")
    es.add_argument("--price-per-hour", type=float, default=None, help="price of one device-hour")
    es.add_argument("--measured-mfu-from", default=None, metavar="WORKDIR",
                    help="use the mean MFU a training run logged in WORKDIR/metrics.jsonl")
    es.add_argument("--warmup-records", type=int, default=1,
                    help="leading metrics.jsonl records to skip (the first window includes compilation)")
    es.add_argument("--buckets", action="store_true", help="also show every bucket of every stage")
    es.add_argument("--json", action="store_true")
    es.set_defaults(func=_estimate)

    co = sub.add_parser("compare", help="published training budgets, raw and normalised to A100-equivalent hours")
    co.add_argument("--config", default=DEFAULT_CONFIG, help="config for the implied-MFU line")
    co.add_argument("--schedule", default=DEFAULT_SCHEDULE, help="schedule for the implied-MFU line")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=_compare)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; parsed by its own module
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # schedule/config/metrics errors name the file and field
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
