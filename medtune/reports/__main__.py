"""``python -m medtune.reports``: the report of a run, the index of runs, two runs compared.

    python -m medtune.reports report [outputs/<run-id>]     # make report [RUN=...]; default: the latest run
    python -m medtune.reports index                         # outputs/index.html only
    python -m medtune.reports compare outputs/<a> outputs/<b> [--html PATH]   # make compare RUNS="..."

Exit status 0, or 2 with a message naming the problem and the fix for bad input (no such run, not two runs).
"""

from __future__ import annotations

import argparse
import sys

from medtune.reports import compare, render


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status (0 done, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="python -m medtune.reports", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="a run's report (index.html, notebooks as HTML) and the index of runs")
    p.add_argument("run", nargs="?", default="", help="outputs/<run-id> or the run id (default: the latest run)")
    sub.add_parser("index", help="outputs/index.html: every run as one row, newest first")
    p = sub.add_parser("compare", help="two runs side by side (Markdown here, and an HTML page)")
    p.add_argument("runs", nargs="*", help="the two runs: outputs/<a> outputs/<b>")
    p.add_argument("--html", default=None, help="where to write the page (default: outputs/compare-<a>-vs-<b>.html)")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            run = render.find_run(args.run, "RUN")
            path = render.write_report(run)
            print(f"report: {path}\nall runs: {run.path.parent / 'index.html'}")
        elif args.command == "index":
            print(f"all runs: {render.write_index()}")
        else:
            if len(args.runs) != 2:
                raise render.ReportError(
                    f"compare takes exactly two runs, got {len(args.runs)}"
                    f"{': ' + ' '.join(args.runs) if args.runs else ''}. Give them as "
                    'make compare RUNS="outputs/<run-a> outputs/<run-b>" (A first; differences are B minus A).')
            a, b = (render.find_run(r, "RUNS") for r in args.runs)
            cmp = compare.compare_runs(a, b)
            print(compare.to_markdown(cmp))
            print(f"page: {compare.write_html(cmp, args.html)}")
    except (render.ReportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
