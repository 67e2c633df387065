"""Training metrics to `OUTPUT/metrics.jsonl` (one JSON object per line) and TensorBoard (`OUTPUT/tb`)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """`log({"iter": 20, "loss": 1.3, "val_miou": ...})`; scalars also go to TensorBoard
    (`train/loss`, `val/miou`, ...).

    On resume (`resume_from=iteration`) records after that iteration are dropped, from the JSON file
    and from TensorBoard (purge_step), so a run killed after its last checkpoint logs no duplicates.
    `revalidating`: the resumed run validates `resume_from` again (its checkpoint was saved before
    that validation finished), so a validation record already logged there goes too.
    """

    def __init__(self, output_dir: str | Path, resume_from: int | None = None, tensorboard: bool = True,
                 revalidating: bool = False):
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        kept = []
        if resume_from is not None:
            kept = [r for r in read_records(self.path) if r.get("iter", 0) < resume_from or (
                r.get("iter", 0) == resume_from and not (revalidating and any(k.startswith("val_") for k in r)))]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at or after it: the checkpoint's own iteration stays, unless it
            # is validated again; then its step goes and its kept training record is written again.
            purge = None if resume_from is None else resume_from + (0 if revalidating else 1)
            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=purge)
            if revalidating:
                for record in kept:
                    if record.get("iter") == resume_from:
                        self._to_tensorboard(record)

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict) -> None:
        for key, value in record.items():
            if key != "iter" and isinstance(value, (int, float)) and math.isfinite(value):
                # val_miou -> val/miou, loss -> train/loss
                tag = "val/" + key[4:] if key.startswith("val_") else f"train/{key}"
                self.tb.add_scalar(tag, value, record["iter"])

    def records(self) -> list[dict]:
        return read_records(self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
