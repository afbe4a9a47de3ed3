"""`lbs cluster ray|slurm`: place workers on a Ray cluster or through Slurm and scale
them with the queue until stopped (Ctrl-C, SIGTERM), which stops the workers held.

    lbs cluster ray --address ray://head:10001 --max-workers 8 --labels h100
    lbs cluster slurm --partition gpu --max-workers 8 --time 240 [--dry-run]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from backend.apps.cluster.controller import Controller, ScalePolicy, worker_overrides
from backend.apps.worker_process import die_with_parent
from backend.common.config import load_settings_or_report
from backend.common.logs import setup_logging
from backend.common.setting_parsers import labels as parse_labels
from backend.queue.cluster import PoolShape


def _labels(text: str) -> tuple[str, ...]:
    try:
        return parse_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _resource(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    try:
        return name.strip(), float(amount or "1")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=AMOUNT, e.g. h100=1") from None


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
        return value
    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--max-workers", type=_positive(int), metavar="N",
                      help="scale with the queue from 0 up to N workers; idle ones exit")
    size.add_argument("--workers", type=_positive(int), metavar="N",
                      help="hold N workers (replaced when they die), without idle exit")
    parser.add_argument("--gpus-per-worker", type=int, default=1, metavar="G",
                        help="GPUs each worker holds (0: CPU workers; default 1)")
    parser.add_argument("--labels", type=_labels, default=(), metavar="a,b",
                        help="worker labels of the pool (a GPU kind…): jobs pinned to one "
                             "run there")
    parser.add_argument("--pool", default=None, metavar="NAME",
                        help="the pool's name, also a label of its workers (default: "
                             "<engine>-<G>gpu)")
    parser.add_argument("--idle-exit", type=_positive(float), default=120.0,
                        metavar="SECONDS",
                        help="a worker finding nothing to run this long exits (default 120)")
    parser.add_argument("--cpus", type=_positive(int), default=4, metavar="C",
                        help="CPUs each worker asks for (default 4)")
    parser.add_argument("--interval", type=_positive(float), default=5.0, metavar="SECONDS",
                        help="how often the controller reads the queue (default 5)")
    parser.add_argument("--parent-pid", type=int, metavar="PID",
                        help="stop when the process PID ends (the server passes its own)")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Place workers on a cluster and scale them with the queue "
                               "(LBS_DATABASE_URL: the PostgreSQL every worker reaches).",
        epilog="examples:\n  lbs cluster ray --address auto --max-workers 4\n"
               "  lbs cluster slurm --partition gpu --max-workers 4 --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    engines = parser.add_subparsers(dest="engine", required=True, metavar="ray|slurm")
    ray = engines.add_parser("ray", help="workers as Ray actors",
                             description="Workers as Ray actors, each holding its GPUs as "
                                         "Ray resources.")
    _common(ray)
    ray.add_argument("--address", default=None,
                     help="the Ray cluster (`auto`, `ray://head:10001`); default: a local "
                          "Ray, started here")
    ray.add_argument("--num-gpus", type=int, default=None, metavar="N",
                     help="GPUs a local Ray declares (default: those it detects)")
    ray.add_argument("--resource", type=_resource, action="append", default=[],
                     metavar="NAME=AMOUNT",
                     help="a custom Ray resource each worker asks for (e.g. h100=1); repeat")
    ray.add_argument("--max-runtime", type=_positive(float), default=None, metavar="SECONDS",
                     help="each worker stops after this long, giving its job back")
    slurm = engines.add_parser("slurm", help="workers as an sbatch job array",
                               description="Workers as tasks of sbatch job arrays, one "
                                           "worker per task.")
    _common(slurm)
    slurm.add_argument("--partition", default=None, help="the partition (default: Slurm's)")
    slurm.add_argument("--time", type=_positive(int), default=240, metavar="MINUTES",
                       help="each task's time limit; its worker stops 2 minutes before, "
                            "giving its job back (default 240)")
    slurm.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                       help="another #SBATCH line, e.g. --account=lab; repeat")
    slurm.add_argument("--log-dir", type=Path, default=Path("."), metavar="DIR",
                       help="where the tasks write their logs (default: here)")
    slurm.add_argument("--dry-run", action="store_true",
                       help="print the script of a full scale-up and submit nothing")
    return parser


def main(argv: list[str] | None = None, prog: str = "lbs cluster") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.parent_pid is not None and not die_with_parent(args.parent_pid):
        return 0
    settings = load_settings_or_report()
    if settings is None:
        return 2
    setup_logging(settings.log_level)
    count = args.max_workers or args.workers
    pool = PoolShape(args.pool or f"{args.engine}-{args.gpus_per_worker}gpu", args.labels,
                     max(0, args.gpus_per_worker))
    policy = ScalePolicy(max_workers=count, min_workers=args.workers or 0,
                         idle_exit_s=None if args.workers else args.idle_exit,
                         interval_s=args.interval)
    overrides = worker_overrides(settings, pool)
    if args.engine == "slurm":
        from backend.apps.cluster.slurm_pool import SlurmOptions, SlurmPool, render_script

        options = SlurmOptions(partition=args.partition, cpus=args.cpus,
                               time_minutes=args.time, log_dir=args.log_dir,
                               extra=tuple(args.sbatch_option))
        if args.dry_run:
            print(render_script(pool, options, count, overrides["LBS_WORKER_LABELS"],
                                policy.idle_exit_s), end="")
            return 0
        engine = SlurmPool(pool, options, {**settings.child_env(), **overrides},
                           labels=overrides["LBS_WORKER_LABELS"],
                           idle_exit_s=policy.idle_exit_s)
    else:
        engine = _ray_pool(args, pool, overrides, policy)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Controller(settings, pool, engine, policy).run(stop)
    return 0


def _ray_pool(args: argparse.Namespace, pool: PoolShape, overrides: dict[str, str],
              policy: ScalePolicy):
    try:
        import ray
    except ImportError:
        print("Ray is not installed here: pip install 'llm-bench-shower[cluster]'",
              file=sys.stderr)
        raise SystemExit(2) from None
    from backend.apps.cluster.ray_pool import RayPool

    ray.init(address=args.address, num_gpus=args.num_gpus if args.address is None else None,
             include_dashboard=False)
    return RayPool(pool, overrides, idle_exit_s=policy.idle_exit_s,
                   max_runtime_s=args.max_runtime, cpus=args.cpus,
                   resources=dict(args.resource))
