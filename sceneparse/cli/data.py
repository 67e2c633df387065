"""`sceneparse data check ROOT|CONFIG`: find what is wrong with a dataset before training on it.

Exit status: 0 no errors (warnings allowed), 1 errors found, 2 usage mistakes (bad path, config).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sceneparse.cli.options import DATASET_KINDS


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="dataset tools (check)", description="Dataset tools.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = sub.add_parser(
        "check",
        help="check a dataset: unreadable files, unpaired files, size mismatches, bad label values...",
        description=(
            "Read every image and label once and report unreadable or truncated images, images "
            "without labels (and labels without images), image/label size mismatches, label values "
            "that are neither a class nor the ignore value, RGB colour labels, EXIF-rotated images, "
            "duplicate images, classes that never occur, and the pixels per class. "
            "Exit status 1 when there is an error."
        ),
    )
    check.add_argument("target", metavar="ROOT|CONFIG", help="dataset folder, or a YAML config with a data: section")
    check.add_argument("--kind", choices=DATASET_KINDS, help="dataset layout (default: detected)")
    check.add_argument("--split", help="check only this split (default: every split found)")
    check.add_argument("--classes-file", help="folder datasets: classes YAML/JSON (default: ROOT/classes.yaml)")
    check.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    check.add_argument("--histogram", metavar="PNG", help="save the pixels-per-class bar chart to this PNG")
    check.add_argument("--output", metavar="DIR", help="write report.json and histogram.png into DIR")
    check.add_argument("--workers", type=int, default=None, help="reader threads (default: 2 x CPUs, at most 8)")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(func=run_check)


def run_check(args) -> int:
    from sceneparse.data.check import check_datasets, datasets_to_check

    datasets, root = datasets_to_check(args.target, kind=args.kind, split=args.split, classes_file=args.classes_file)
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    report = check_datasets(datasets, root=root, workers=args.workers, progress=progress)
    if args.histogram:
        report.save_histogram(args.histogram)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        report.save_histogram(out / "histogram.png")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_text())
    return 0 if report.ok else 1
