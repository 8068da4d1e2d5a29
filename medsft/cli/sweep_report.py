"""`medsft sweep-report SWEEP_DIR [--out DIR] [--direction minimize|maximize] [--no-plots]`: the table
(report.md, report.csv; best first) and PNG plots of a Hydra multirun folder (medsft.sweep.report)."""

from __future__ import annotations

from medsft.cli.usage import CommandParser, examples_block
from medsft.sweep.report import format_value, markdown_table, write_report

# Commands of README.md (tests/test_cli_help.py checks that each is there).
EXAMPLES = [
    ("medsft sweep-report multirun_outputs/<date>/<time>", "report.md, report.csv and the plots, in the sweep"),
    ("medsft sweep-report multirun_outputs/<date>/<time> --out reports/lr_sweep", "... elsewhere"),
    ("medsft sweep-report multirun_outputs/<date>/<time> --no-plots", "only the tables"),
]


def cli_main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="medsft sweep-report",
        description="medsft sweep-report: the table (report.md, report.csv; best objective first, failed jobs with "
                    "their error) and PNG plots (loss curves, objective against each swept parameter) of a Hydra "
                    "multirun folder. A sweep writes it by itself at its end; this rebuilds it, e.g. while jobs run.",
        epilog=examples_block(EXAMPLES),
    )
    parser.add_argument("sweep_dir", help="the multirun folder, e.g. multirun_outputs/<date>/<time>")
    parser.add_argument("--out", default=None, help="where to write the report (default: the sweep folder)")
    parser.add_argument("--direction", choices=("minimize", "maximize"), default=None,
                        help="how to rank the objective (default: the sweep's, else minimize: it is a loss)")
    parser.add_argument("--no-plots", action="store_true", help="only the tables")
    args = parser.parse_args(argv)
    report = write_report(args.sweep_dir, args.out, args.direction, plots=not args.no_plots)
    print(markdown_table(report.jobs, report.swept))
    best = report.best
    if best is not None:
        print(f"\nbest: job {best.num if best.num is not None else best.name}, objective {format_value(best.objective)}: "
              f"{' '.join(best.overrides)}")
    for job in report.failed:
        print(f"failed: job {job.num if job.num is not None else job.name}: {job.error}")
    print("\nwritten: " + ", ".join(str(p) for p in report.files))
    return 0
