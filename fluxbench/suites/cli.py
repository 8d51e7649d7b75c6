"""Command line of the suites: ``fluxbench suite list|run|merge``, ``fluxbench report``, ``fluxbench gate``.

Every command takes ``--help`` (with an example); bad arguments give a usage error (exit
2), not a traceback. Default output directory: ``runs/suites`` (git-ignored); write the
committed results with ``--out results/suites``.

Threads: ``suite run``, ``gate`` and ``report`` set torch's intra-op threads to ``--threads``
(default :data:`DEFAULT_THREADS` = 1) before any work. torch's own default, one thread per
core, oversubscribes the CPU as soon as several processes share it (the shards of
``suite run --shard i/n``, parallel test workers, other jobs), and the suites' problems
(d <= 20, batches of a few thousand) gain little from more threads even alone (on a 2-core
machine shared with other jobs, the 16 cases of the chunked-loss test took 3.6 s at one
thread and 111 s at two). Pass ``--threads N`` for one process on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from ..argtypes import positive_int

__all__ = ["main_suite", "main_report", "main_gate"]

DEFAULT_OUT = "runs/suites"
DEFAULT_THREADS = 1


def _default_suites_dir() -> str:
    here = Path("suites")
    if here.is_dir():
        return "suites"
    repo = Path(__file__).resolve().parents[2] / "suites"
    return str(repo) if repo.is_dir() else "suites"


def _parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _common(p: argparse.ArgumentParser, *, device: bool = True, out: bool = True) -> None:
    p.add_argument("--suites-dir", default=None, help="directory of the suite files (default: ./suites)")
    if out:
        p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    if device:
        p.add_argument("--device", default=None, help="torch device: cpu (default), cuda, cuda:1, mps")


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int(1), default=DEFAULT_THREADS,
                   help=f"torch CPU threads of this process (default: {DEFAULT_THREADS}; torch's default of one "
                        "per core oversubscribes when shards or other jobs share the machine, and these "
                        "small problems gain little from more)")


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _tier(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tier", default="quick", choices=("quick", "full"), help="budget tier (default: quick)")


def _log(quiet: bool) -> Callable[[str], None] | None:
    if quiet:
        return None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _guard(parser: argparse.ArgumentParser, fn: Callable[[], int]) -> int:
    """Run ``fn``; a ValueError (bad suite file, shard, device, damaged records) is a usage error."""
    try:
        return fn()
    except ValueError as exc:  # RecordsError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted (finished runs are recorded; rerun to continue)\n")
    return 1


# ------------------------------------------------------------------ suite
def main_suite(argv: Sequence[str] | None = None) -> int:
    """``fluxbench suite list|run|merge``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser("fluxbench suite", "List, run and merge stationarity suites (suites/*.toml).",
                     "fluxbench suite run gmm2d --tier quick --shard 1/4 --out runs/suites")
    sub = parser.add_subparsers(dest="action", metavar="action")
    p_list = sub.add_parser("list", help="list the suites with their kind and number of runs per tier",
                            description="List the suites with their kind, description and runs per tier.",
                            epilog="example:\n  fluxbench suite list --suites-dir suites",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p_list, device=False, out=False)
    p_run = sub.add_parser("run", help="run a suite's tier (skips runs already recorded)",
                           description="Run the runs of a suite's tier that are not yet recorded for this commit "
                                       "and suite file; append each finished run to OUT/records/NAME.csv.",
                           epilog="example:\n  fluxbench suite run gmm2d --tier quick --shard 2/4 --device cuda",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p_run.add_argument("name", help="suite name (suites/NAME.toml) or path to a suite file")
    _tier(p_run)
    p_run.add_argument("--shard", default=None, help="run shard I of N (round-robin over the runs), e.g. 2/4")
    p_run.add_argument("--perturb", default=None,
                       help="break the fields on purpose: temperature:C, drop-rotation, sign:I (own records file)")
    p_run.add_argument("--quiet", action="store_true", help="no progress lines")
    _common(p_run)
    _threads(p_run)
    p_merge = sub.add_parser("merge", help="merge records files (the shards of a job array)",
                             description="Union of records files; duplicate rows dropped; damaged files refused.",
                             epilog="example:\n  fluxbench suite merge a/records/gmm2d.csv b/records/gmm2d.csv "
                                    "-o runs/suites/records/gmm2d.csv",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p_merge.add_argument("inputs", nargs="+", help="records files")
    p_merge.add_argument("-o", "--output", required=True, help="merged records file")
    args = parser.parse_args(argv)
    if args.action is None:
        parser.print_help()
        return 2
    if args.action == "list":
        return _guard(p_list, lambda: _list(args))
    if args.action == "run":
        return _guard(p_run, lambda: _run(args))
    return _guard(p_merge, lambda: _merge(args))


def _list(args: argparse.Namespace) -> int:
    from .spec import list_suites

    suites = list_suites(args.suites_dir or _default_suites_dir())
    if not suites:
        print("(no suites)")
        return 0
    width = max(len(s.name) for s in suites)
    for s in suites:
        counts = ", ".join(f"{t} {len(s.runs(t))} runs" for t in s.tiers)
        print(f"{s.name:<{width}}  {s.kind:<12}  {counts}, {len(s.claims)} claims  {s.description}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .gate import records_path
    from .runner import run_suite
    from .spec import find_suite, parse_shard

    suite = find_suite(args.name, args.suites_dir or _default_suites_dir())
    shard = parse_shard(args.shard)
    _set_threads(args.threads)
    out = Path(args.out)
    path = records_path(out, suite.name, shard=shard, perturb=args.perturb)
    t0 = time.perf_counter()
    rows = run_suite(suite, tier=args.tier, records=path, device=args.device, shard=shard,
                     artifacts_dir=out / "artifacts" if args.perturb is None else None, perturb=args.perturb,
                     log=_log(args.quiet))
    print(f"{suite.name} [{args.tier}]: {rows['run'].nunique() if len(rows) else 0} runs recorded in {path} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .records import merge

    df = merge(args.inputs, args.output)
    print(f"merged {len(args.inputs)} files: {len(df)} rows, {df['run'].nunique()} runs -> {args.output}")
    return 0


# ------------------------------------------------------------------ report
def main_report(argv: Sequence[str] | None = None) -> int:
    """``fluxbench report``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser("fluxbench report",
                     "Render the records under OUT as Markdown and HTML with plots (OUT/report): metrics against "
                     "rollout length with the noise-floor band, flux vs DSM, streamlines of 2-D runs, the claims table. "
                     "Each suite's most recent commit and suite file are shown.",
                     "fluxbench report --out results/suites --tier quick")
    _common(parser, device=False)  # reads records and CPU artifacts only: nothing to place on a device
    _tier(parser)
    _threads(parser)
    parser.add_argument("--alpha", type=float, default=0.05, help="family-wise level of the p-value claims (Holm)")
    args = parser.parse_args(argv)
    return _guard(parser, lambda: _report(args))


def _report(args: argparse.Namespace) -> int:
    from .claims import evaluate
    from .gate import latest_records, load_records, suite_claims
    from .report import render_report
    from .spec import list_suites

    _set_threads(args.threads)
    out = Path(args.out)
    df = load_records(out)
    if not len(df):
        raise ValueError(f"no records under {out / 'records'}; run `fluxbench gate --out {out}` first")
    df = latest_records(df)
    names = set(df["suite"])
    suites = [s for s in list_suites(args.suites_dir or _default_suites_dir()) if s.name in names]
    claims = [c for s in suites for c in suite_claims(s)]
    results = evaluate(claims, df, args.tier, alpha_family=args.alpha)
    art = out / "artifacts"
    md, html = render_report(df[df["tier"] == args.tier], results, out / "report", artifacts_dir=art if art.is_dir() else None)
    print(f"report: {md}\n        {html}")
    return 0


# ------------------------------------------------------------------ gate
def main_gate(argv: Sequence[str] | None = None) -> int:
    """``fluxbench gate``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(
        "fluxbench gate",
        "Run what is missing of the suites' tier, evaluate every claim (p-value claims as one Holm family at "
        "--alpha), print the claims table, and exit 1 naming every failed claim (or unexpected pass) with its "
        "evidence.",
        "fluxbench gate gmm2d estimator --tier quick --out runs/suites",
    )
    parser.add_argument("suites", nargs="*", metavar="SUITE", help="suite names (default: every suite)")
    _tier(parser)
    _common(parser)
    _threads(parser)
    parser.add_argument("--alpha", type=float, default=0.05, help="family-wise level of the p-value claims (Holm)")
    parser.add_argument("--perturb", default=None,
                        help="break the fields on purpose (temperature:C, drop-rotation, sign:I): claims should fail")
    parser.add_argument("--no-run", action="store_true", help="evaluate the recorded runs only")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must lie in (0, 1); got {args.alpha}")
    return _guard(parser, lambda: _gate(args))


def _gate(args: argparse.Namespace) -> int:
    from .claims import format_results, gate_exit_code
    from .gate import gate
    from .spec import find_suite, list_suites

    d = args.suites_dir or _default_suites_dir()
    suites = [find_suite(n, d) for n in args.suites] if args.suites else list_suites(d)
    if not suites:
        raise ValueError(f"no suites in {d!r}")
    _set_threads(args.threads)
    t0 = time.perf_counter()
    results, _ = gate(suites, tier=args.tier, out=args.out, device=args.device, alpha=args.alpha,
                      perturb=args.perturb, run_missing=not args.no_run, log=_log(args.quiet))
    print(format_results(results))
    print(f"gate: {len(suites)} suites, tier {args.tier}, {time.perf_counter() - t0:.1f} s")
    code = gate_exit_code(results)
    for r in results:
        if r.verdict in ("fail", "xpass"):
            what = "UNEXPECTED PASS" if r.verdict == "xpass" else "FAILED"
            print(f"{what} {r.suite}:{r.id}: {r.evidence}", file=sys.stderr)
    return code
