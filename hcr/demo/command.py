"""``hcr demo``: the flags (defaults from ``DemoSettings``) and the entry point."""

from __future__ import annotations

import argparse
import shlex
import sys

from hcr.argtypes import field_defaults, non_negative_int, positive_float, positive_int

__all__ = ["add_arguments", "int_list", "main", "settings_from_args"]


def int_list(minimum: int):
    """An argparse type: comma-separated integers, each >= ``minimum`` (``2,4,8``)."""

    def parse(text: str) -> tuple[int, ...]:
        expected = f"expected comma-separated integers >= {minimum}, e.g. 2,4,8, got {text!r}"
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(expected) from None
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(expected)
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hcr.demo.experiment import DemoSettings
    from hcr.demo.reasoner import ReasonerSettings

    d, r = field_defaults(DemoSettings), field_defaults(ReasonerSettings)
    parser.add_argument("--out", default=d.out, help=f"output folder; trained stages are reused from it (default {d.out})")
    parser.add_argument("--windows", type=int_list(1), default=d.windows,
                        help=f"windows W to train a compressor for (default {','.join(map(str, d.windows))})")
    parser.add_argument("--keep-last", type=int_list(0), default=d.keep_last,
                        help="reasoning tokens kept uncompressed after the last window; each value is evaluated "
                             f"(default {','.join(map(str, d.keep_last))}; the first also runs the recompute oracle)")
    parser.add_argument("--train-items", type=positive_int, default=d.train_items,
                        help=f"training questions (default {d.train_items})")
    parser.add_argument("--eval-items", type=positive_int, default=d.eval_items,
                        help=f"held-out questions (default {d.eval_items})")
    parser.add_argument("--min-steps", type=positive_int, default=d.min_steps,
                        help=f"fewest operations per question (default {d.min_steps})")
    parser.add_argument("--max-steps", type=positive_int, default=d.max_steps,
                        help=f"most operations per question (default {d.max_steps})")
    parser.add_argument("--reasoner-steps", type=positive_int, default=r.steps,
                        help=f"optimizer steps of the reasoner (default {r.steps})")
    parser.add_argument("--reasoner-hidden", type=positive_int, default=r.hidden_size,
                        help=f"reasoner hidden size (default {r.hidden_size})")
    parser.add_argument("--reasoner-layers", type=positive_int, default=r.layers,
                        help=f"reasoner layers (default {r.layers})")
    parser.add_argument("--pooler-steps", type=positive_int, default=d.pooler_steps,
                        help=f"optimizer steps of each compressor (default {d.pooler_steps})")
    parser.add_argument("--pooler-layers", type=positive_int, default=d.pooler_layers,
                        help=f"pooler layers, copied from the reasoner's first ones (default {d.pooler_layers})")
    parser.add_argument("--pooler-lr", type=positive_float, default=d.pooler_lr,
                        help=f"compressor learning rate (default {d.pooler_lr})")
    parser.add_argument("--lora-r", type=non_negative_int, default=d.lora_r,
                        help=f"LoRA rank of the pooler, 0 trains it fully (default {d.lora_r})")
    parser.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                        help=f"questions generated together in the evaluation (default {d.batch_size})")
    parser.add_argument("--recompute-items", type=non_negative_int, default=d.recompute_items,
                        help=f"held-out questions also run through the recompute oracle (default {d.recompute_items})")
    parser.add_argument("--device", default=d.device, help=f"torch device (default {d.device})")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of the corpus and the training (default {d.seed})")
    parser.add_argument("--fresh", action="store_true", help="retrain every stage even if --out holds it")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-sized run (under a minute; its accuracies mean nothing); other flags still apply")


def settings_from_args(args: argparse.Namespace):
    """DemoSettings from the flags; with ``--quick`` the flags left at their defaults take the smoke sizes."""
    from dataclasses import fields, replace

    from hcr.demo.experiment import DemoSettings

    parser_defaults = DemoSettings()
    base = DemoSettings.quick() if args.quick else parser_defaults
    changed = {}
    for name in (f.name for f in fields(DemoSettings) if hasattr(args, f.name) and f.name != "reasoner"):
        if getattr(args, name) != getattr(parser_defaults, name):
            changed[name] = getattr(args, name)
    reasoner = base.reasoner
    for flag, name in (("reasoner_steps", "steps"), ("reasoner_hidden", "hidden_size"), ("reasoner_layers", "layers")):
        if getattr(args, flag) != getattr(parser_defaults.reasoner, name):
            reasoner = replace(reasoner, **{name: getattr(args, flag)})
    return replace(base, reasoner=reasoner, **changed)


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the demo; ``argv`` (the command line after ``hcr``) goes into the report."""
    from hcr.demo.experiment import run_demo
    from hcr.demo.report import table

    settings = settings_from_args(args)
    results = run_demo(settings, command="hcr " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print()
    print(table(results))
    print(f"\nhcr demo: report, results and plots in {settings.out}/ ({results['total_seconds']:.0f} s)")
    return 0
