"""Queue the MSE vs BCE budget study as DVC experiments (budgets x training seeds) and start the queue.

    python studies/budget_study.py --study NAME [--budgets default epochs3x size128] [--seeds 0 1 2]
                                   [--losses awing] [--jobs 1] [--wait] [--no-start] [--dry-run]

Each (budget, seed) is one ``dvc exp run --queue -n <study>-<budget>-s<seed> -S base.study=<study>
-S train.seed=<seed> -S <budget overrides>``; then ``dvc queue start -j <jobs>``. Every MLflow run of these
experiments is tagged ``study=<study>``; ``python studies/study_report.py --study <study>`` rebuilds the table and the
figure from the store once they are done. The study runs outside the default pipeline: params.yaml is not changed.

Budgets: a name from :data:`BUDGETS`, or ``NAME:KEY=VALUE[,KEY=VALUE...]`` for another one, e.g.
``size96:augment.size=96``. ``base.study`` is a train/evaluate param, so every experiment retrains even where the
run-cache holds the same params (and logs fresh MLflow runs); data and targets are rebuilt only when a budget changes
them (``augment.size``).

``--losses awing`` trains only those losses (``-S train.losses=[awing]``) and names the experiments
``<study>-<budget>-awing-s<seed>``: a loss added to a study later runs next to the rows already there, and
``studies/study_report.py`` reads the budget from either name.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

import yaml

from facemarks.core.params import LOSS_NAMES

BUDGETS: dict[str, tuple[str, ...]] = {
    "default": (),  # params.yaml as it is
    "epochs3x": ("train.epochs_phase1=6", "train.epochs_phase2=3"),  # 3x the default 2 + 1 epochs
    "size128": ("augment.size=128",),  # 128 px input -> 32x32 heatmaps
}
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # also a valid git ref part and a plain YAML string


def parse_budget(text: str) -> tuple[str, tuple[str, ...]]:
    """``name`` of :data:`BUDGETS` or ``NAME:KEY=VALUE[,KEY=VALUE...]`` -> (name, overrides)."""
    if ":" not in text:
        if text not in BUDGETS:
            raise argparse.ArgumentTypeError(f"unknown budget {text!r}: one of {', '.join(BUDGETS)} "
                                             "or NAME:KEY=VALUE,...")
        return text, BUDGETS[text]
    name, _, spec = text.partition(":")
    overrides = tuple(s.strip() for s in spec.split(",") if s.strip())
    if not NAME.match(name) or not overrides or not all(re.match(r"^[\w.]+=\S+$", o) for o in overrides):
        raise argparse.ArgumentTypeError(f"budget {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, overrides


def study_name(text: str) -> str:
    if not NAME.match(text) or yaml.safe_load(text) != text:
        raise argparse.ArgumentTypeError(f"study name {text!r}: letters, digits, '_' and '-', starting with a letter "
                                         "(and not a YAML keyword such as 'yes' or 'off')")
    return text


def commands(study: str, budgets: list[tuple[str, tuple[str, ...]]], seeds: list[int], jobs: int,
             start: bool = True, losses: tuple[str, ...] = ()) -> list[list[str]]:
    """The ``dvc`` command lines, in order: one queued experiment per (budget, seed), then the queue start.
    ``losses``: train only these (``train.losses``), named ``<study>-<budget>-<loss>[-<loss>...]-s<seed>``."""
    out = []
    tag = "".join(f"-{loss}" for loss in losses)
    for name, overrides in budgets:
        for seed in seeds:
            cmd = ["dvc", "exp", "run", "--queue", "-n", f"{study}-{name}{tag}-s{seed}", "-S", f"base.study={study}",
                   "-S", f"train.seed={seed}"]
            if losses:
                cmd += ["-S", f"train.losses=[{','.join(losses)}]"]
            for o in overrides:
                cmd += ["-S", o]
            out.append(cmd)
    if start:
        out.append(["dvc", "queue", "start", "-j", str(jobs)])
    return out


def queue_count(study: str, states: str = "Queued|Running") -> int:
    """This study's experiments (named ``<study>-…``) in ``states`` according to ``dvc queue status``."""
    out = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if f"{study}-" in line and re.search(rf"\b({states})\b", line))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, type=study_name, help="study name: base.study, MLflow tag study")
    parser.add_argument("--budgets", nargs="+", type=parse_budget, default=[parse_budget(b) for b in BUDGETS],
                        metavar="BUDGET", help=f"budget names ({', '.join(BUDGETS)}) or NAME:KEY=VALUE,...")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (train.seed)")
    parser.add_argument("--losses", nargs="+", choices=LOSS_NAMES, default=[],
                        help="train only these losses (default: train.losses of params.yaml)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel queue workers (default 1: 2 cores)")
    parser.add_argument("--no-start", action="store_true", help="queue only; start later with `dvc queue start`")
    parser.add_argument("--wait", action="store_true",
                        help="wait until this study's experiments are done, then print `dvc queue status`")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if len({name for name, _ in args.budgets}) != len(args.budgets) or len(set(args.seeds)) != len(args.seeds):
        parser.error("budget names and seeds must not repeat")
    if len(set(args.losses)) != len(args.losses):
        parser.error("losses must not repeat")

    for cmd in commands(args.study, args.budgets, args.seeds, args.jobs, start=not args.no_start,
                        losses=tuple(args.losses)):
        print(" ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    if args.wait and not args.dry_run and not args.no_start:
        while queue_count(args.study):
            time.sleep(10)
        print(subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True).stdout)
        failed = queue_count(args.study, "Failed")
        if failed:
            print(f"budget_study: {failed} experiment(s) failed: `dvc queue logs <name>` shows why", file=sys.stderr)
            return 1
    print(f"then: python studies/study_report.py --study {args.study}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
