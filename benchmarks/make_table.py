"""Markdown table from `sceneparse bench --json` reports: `python benchmarks/make_table.py A.json B.json ...`.

Below the table: for each report holding both `train` and `train-data` rows of one variant, the
end-to-end ratio (real data loading / synthetic tensors), which issue 4 wants at >= 90 %.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _data_label(data: dict | None) -> str:
    """Which pipeline fed the data rows: dataset kind, where it augments, how many workers."""
    if not data:
        return ""
    where = data.get("augment_on", "workers") + (", cached" if data.get("cache_in_memory") else "")
    return f" [{data['kind']}: augment on {where}, {data.get('workers', '?')} workers]"


def table(paths: list[Path]) -> str:
    lines = ["| model | task | variant | batch | ms/iter | img/s | vs fp32 eager | peak GPU MiB | agree % |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    setups, ratios = [], []
    for path in paths:
        report = json.loads(path.read_text())
        meta = report["meta"]
        name = meta.get("model_name") or f"{meta['model'].get('encoder')}-{meta['model'].get('decoder')}"
        for r in report["results"]:
            task = r["task"] + (_data_label(meta.get("data")) if r["task"] in ("data", "train-data") else "")
            if r["note"]:
                lines.append(f"| {name} | {task} | {r['variant']} | {r['batch']} | {r['note']} | | | | |")
                continue
            speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            agreement = r.get("agreement")  # absent in reports older than the column
            lines.append(f"| {name} | {task} | {r['variant']} | {r['batch']} | "
                         f"{_num(r['ms_per_iter'], '.1f')} | {_num(r['images_per_s'], '.1f')} | "
                         f"{speedup} | {_num(r['peak_mem_mib'], '.0f')} | "
                         f"{_num(None if agreement is None else 100 * agreement, '.2f')} |")
        speeds = {(r["task"], r["variant"]): r["images_per_s"] for r in report["results"] if r["images_per_s"]}
        for (task, variant), fed in speeds.items():
            synthetic = speeds.get(("train", variant))
            if task == "train-data" and synthetic:
                ratios.append(f"{name} {variant}: end-to-end {fed:.1f} img/s = "
                              f"{100 * fed / synthetic:.0f} % of the synthetic-tensor step ({synthetic:.1f} img/s).")
        setup = (f"{meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
                 f"{meta['size'][0]}x{meta['size'][1]}, {meta['date'][:10]}")
        if setup not in setups:
            setups.append(setup)
    lines.append("")
    lines += ratios + [""] * bool(ratios)
    lines += [f"Measured on {s}." for s in setups]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/make_table.py REPORT.json [...]")
    print(table([Path(p) for p in sys.argv[1:]]))
