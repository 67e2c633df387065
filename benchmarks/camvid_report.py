"""The markdown block that docs/camvid.md and docs/benchmarks.md want from one CamVid run.

    python benchmarks/camvid_report.py RUN_DIR EVAL_DIR [EVAL_DIR ...] [--wall-clock SECONDS]

RUN_DIR holds the run's metrics.jsonl (and config.yaml, if the whole run folder is at hand);
each EVAL_DIR a `sceneparse eval --output` folder (report.json). Prints: iterations, the speed
over the log windows after the first (its warm-up left out), the validations during training,
and a per-class IoU table with one column per evaluation (fp32, bf16 + channels-last, ...).
benchmarks/gpu/camvid.sh runs it on the GPU machine and returns the block as camvid.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_label(report: dict, folder: Path) -> str:
    """How an evaluation ran, for its column header: the autocast dtype, or fp32."""
    amp = (report.get("settings") or {}).get("amp_dtype")
    return f"{folder.name} ({amp or 'fp32'})"


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def render(records: list[dict], reports: list[tuple[str, dict]], wall_clock_s: float | None = None,
           checkpoint_iteration: int | None = None) -> str:
    steps = [r for r in records if "img_per_s" in r]
    validations = [r for r in records if "val_miou" in r]
    lines = []
    if steps:
        lines.append(f"- iterations: {steps[-1]['iter']} (last logged), final training loss "
                     f"{steps[-1]['loss']:.4f}")
    if checkpoint_iteration is not None:
        ended = steps and checkpoint_iteration == steps[-1]["iter"]
        lines.append(f"- evaluated checkpoint: last.pt of iteration {checkpoint_iteration}"
                     + ("" if ended else " (NOT the end of the run: it stopped before saving its last step)"))
    if steps:
        speeds = [r["img_per_s"] for r in (steps[1:] or steps)]  # the first window holds the warm-up
        lines.append(f"- training speed: median {statistics.median(speeds):.0f} img/s over "
                     f"{len(speeds)} log windows (min {min(speeds):.0f}, max {max(speeds):.0f})")
    if wall_clock_s is not None:
        lines.append(f"- wall-clock of `sceneparse train` (interpreter start-up included): "
                     f"{wall_clock_s // 60:.0f} min {wall_clock_s % 60:.0f} s")
    if validations:
        lines.append("- validation during training (iteration: mIoU %): "
                     + ", ".join(f"{r['iter']}: {pct(r['val_miou'])}" for r in validations))
    for label, report in reports:
        lines.append(f"- `sceneparse eval`, {label}: mIoU {pct(report['mean_iou'])} %, pixel accuracy "
                     f"{pct(report['pixel_accuracy'])} %, {report['num_images']} images")
    if reports:
        lines += ["", "| class | " + " | ".join(f"IoU % {label}" for label, _ in reports) + " |",
                  "|---|" + "---|" * len(reports)]
        first = reports[0][1]["classes"]
        for i, cls in enumerate(first):
            cells = [pct(report["classes"][i]["iou"]) for _, report in reports]
            lines.append(f"| {cls['name']} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{pct(r['mean_iou'])}**" for _, r in reports) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("eval_dirs", type=Path, nargs="*")
    parser.add_argument("--wall-clock", type=float, default=None, help="seconds the training command took")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the evaluated last.pt: its iteration is reported (and whether it ends the run)")
    args = parser.parse_args(argv)
    iteration = None
    if args.checkpoint is not None and args.checkpoint.is_file():
        from sceneparse.engine.checkpoint import load_checkpoint

        iteration = load_checkpoint(args.checkpoint)["train_state"]["iteration"]
    reports = []
    for folder in args.eval_dirs:
        path = folder / "report.json"
        if path.is_file():  # an evaluation that failed left none: report the others
            report = json.loads(path.read_text())
            reports.append((eval_label(report, folder), report))
    print(render(load_records(args.run_dir), reports, args.wall_clock, iteration), end="")


if __name__ == "__main__":
    main()
