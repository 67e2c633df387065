"""Speed benchmarks for any segmentation model: `sceneparse bench`.

Tasks (each at a fixed input size, logits at that size as the Segmenter returns them):
- latency:    inference at batch 1, milliseconds per image.
- throughput: inference at batch N, images per second.
- train:      one training step (forward, loss, backward, SGD step) at batch N on random tensors.
- train-data: the same step fed by the trainer's own data pipeline on a real dataset
              (`engine.feed`: JPEG/PNG decoding in worker processes, augmentation there or
              batched on the device, pinned memory, non-blocking copies).
- data:       that pipeline alone, no model: how many images per second it can deliver (once,
              whatever the variants; with `--augment-on device` the augmentation is on the device).
- eval:       evaluation at batch N: forward, argmax, confusion-matrix update.

Every requested speed option (autocast dtype, channels-last, torch.compile, CUDA graphs) is measured
alone and combined, each next to the fp32 eager run of the same model in the same process, and
reported with its ratio to it; `--variants` picks an explicit list instead (the baseline is always
measured first). Inference rows also report `agreement`: the fraction of output pixels whose
argmax class equals the fp32 eager model's on the same input. Timing: warm-up iterations first,
`torch.cuda.synchronize()` before reading the clock on CUDA, median over repeats.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
import gc
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sceneparse.data import IGNORE_INDEX
from sceneparse.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sceneparse.engine.optim import param_groups
from sceneparse.engine.train import segmentation_loss
from sceneparse.errors import SceneparseError

TASKS = ("latency", "throughput", "train", "train-data", "data", "eval")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FORMAT = "sceneparse-bench/1"


@dataclass(frozen=True)
class Variant:
    """One way of running the model. The default is the fp32 eager baseline."""

    amp: str | None = None  # "bf16" | "fp16"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    @property
    def name(self) -> str:
        parts = [self.amp or "fp32"]
        if self.channels_last:
            parts.append("channels-last")
        if self.compile:
            parts.append("compile")
        if self.cuda_graphs:
            parts.append("cuda-graphs")
        return "fp32-eager" if parts == ["fp32"] else "+".join(parts)


def parse_variant(name: str) -> Variant:
    """The inverse of `Variant.name`: "fp32-eager", "bf16+channels-last+cuda-graphs", ..."""
    name = name.strip()
    if name == "fp32-eager":
        return Variant()
    parts = name.split("+")
    amp = parts.pop(0) if parts and parts[0] in ("fp32", *AMP_DTYPES) else None
    flags = {"channels-last": "channels_last", "compile": "compile", "cuda-graphs": "cuda_graphs"}
    unknown = [p for p in parts if p not in flags]
    if amp is None or unknown or len(set(parts)) != len(parts):
        raise SceneparseError(
            f"unknown bench variant {name!r}",
            "write fp32-eager, or fp32|bf16|fp16 followed by +channels-last, +compile, +cuda-graphs "
            "(in that order), e.g. bf16+channels-last+cuda-graphs",
        )
    variant = Variant(amp=None if amp == "fp32" else amp, **{flags[p]: True for p in parts})
    if variant.name != name:  # one spelling per variant, so report rows match what was asked
        raise SceneparseError(f"bench variant {name!r} is spelled {variant.name!r}")
    return variant


def explicit_variants(names: list[str]) -> list[Variant]:
    """The named variants, the fp32 eager baseline first (added when missing: ratios need it)."""
    chosen = [parse_variant(n) for n in names if n.strip()]
    out = [Variant()]
    for v in chosen:
        if v not in out:
            out.append(v)
    return out


def variants_for(amp: str | None = None, channels_last: bool = False, compile: bool = False,
                 cuda_graphs: bool = False) -> list[Variant]:
    """The fp32 eager baseline, each requested option alone, and all of them together."""
    singles = []
    if amp:
        singles.append(Variant(amp=amp))
    if channels_last:
        singles.append(Variant(channels_last=True))
    if compile:
        singles.append(Variant(compile=True))
    if cuda_graphs:
        singles.append(Variant(cuda_graphs=True))
    out = [Variant(), *singles]
    if len(singles) > 1:
        out.append(Variant(amp=amp, channels_last=channels_last, compile=compile, cuda_graphs=cuda_graphs))
    return out


@dataclass
class BenchSettings:
    size: tuple[int, int] = (512, 512)
    batch: int = 16
    tasks: tuple[str, ...] = ("latency", "throughput", "train", "eval")
    warmup: int = 5
    iters: int = 10  # timed iterations per repeat
    repeats: int = 3  # the median over repeats is reported
    lr: float = 1e-3  # small: the weights only need to stay finite
    deepsup_weight: float = 0.4  # CSAIL's auxiliary-loss weight
    data: dict | None = None  # {"kind": ..., "root": ..., "workers": ...} for train-data
    variants: list[Variant] = field(default_factory=lambda: [Variant()])


@dataclass
class Row:
    task: str
    variant: str
    batch: int
    ms_per_iter: float | None = None
    images_per_s: float | None = None
    speedup: float | None = None  # images_per_s / the fp32 eager baseline's, same task
    peak_mem_mib: float | None = None  # CUDA only
    agreement: float | None = None  # inference: share of pixels whose argmax = fp32 eager's
    note: str | None = None  # why a row has no numbers (skipped or failed)


# ---------------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
            repeats: int) -> float:
    """Median seconds per call of `fn` over `repeats` runs of `iters` calls, after `warmup` calls.
    CUDA work is asynchronous: synchronise before each clock read so the GPU time is counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


# -------------------------------------------------------------------------------- model variants

def _autocast(device: torch.device, variant: Variant):
    if variant.amp is None:
        return contextlib.nullcontext()
    # Autocast's weight-cast cache would hold tensors made outside a CUDA graph capture: off there.
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[variant.amp],
                          cache_enabled=not variant.cuda_graphs)


def _prepare(model: nn.Module, variant: Variant) -> nn.Module:
    """A model set up for `variant`: channels-last memory format and/or torch.compile.
    CUDA graphs with compile use compile's "reduce-overhead" mode (cudagraph trees).
    dynamic=False: every shape gets kernels specialised to it, as a fixed-size deployment would.
    Otherwise the batch-16 task, compiled after the batch-1 one (the same forward code), would
    get batch-generic kernels."""
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if variant.compile:
        mode = "reduce-overhead" if variant.cuda_graphs else None
        model = torch.compile(model, mode=mode, dynamic=False)
    return model


def _input(batch: int, size: tuple[int, int], device: torch.device, variant: Variant,
           seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    if variant.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and deep-supervision logits (None when the decoder has none)."""
    if isinstance(out, torch.Tensor):
        return out, None
    return out.logits, out.aux


def cuda_graph_replay(fn: Callable[[], torch.Tensor], device: torch.device
                      ) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture `fn` (no grad, fixed input tensors it closes over) into a CUDA graph.

    Returns `(replay, output)`: each `replay()` reruns the captured kernels on the current
    contents of the input tensors and overwrites `output` in place. Warm-up runs on a side
    stream first, as torch.cuda.graph requires."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls of other threads (a DataLoader's pin-memory thread) during the
    # capture are theirs, not an error of the capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = fn()
    return graph.replay, output


def _inference_fn(model, variant, device, batch, size):
    model.eval()
    net = _prepare(model, variant)
    x = _input(batch, size, device, variant)

    def forward():
        with torch.no_grad(), _autocast(device, variant):
            return net(x)

    if variant.cuda_graphs and not variant.compile:
        replay, output = cuda_graph_replay(forward, device)

        def forward_graph():
            replay()
            return output

        return forward_graph
    return forward


class _Trainer:
    """One SGD training step as the training loop runs it (autocast, GradScaler for fp16)."""

    def __init__(self, model: nn.Module, variant: Variant, device: torch.device, lr: float,
                 deepsup_weight: float):
        model.train()
        self.net = _prepare(model, variant)
        self.variant = variant
        self.device = device
        self.deepsup_weight = deepsup_weight
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        # The trainer's own optimizer: parameter groups, fused SGD on CUDA.
        self.optimizer = torch.optim.SGD(param_groups(model, lr, lr, weight_decay=1e-4), lr=lr, momentum=0.9,
                                         fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=variant.amp == "fp16")

    def step(self, images: torch.Tensor, target: torch.Tensor) -> None:
        with _autocast(self.device, self.variant):
            loss = segmentation_loss(self.net(images), target, self.criterion, self.deepsup_weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _train_fn(model, variant, device, batch, size, num_classes, settings):
    trainer = _Trainer(model, variant, device, settings.lr, settings.deepsup_weight)
    x = _input(batch, size, device, variant)
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, num_classes, (batch, *size), generator=gen).to(device)
    return lambda: trainer.step(x, y)


def _eval_fn(model, variant, device, batch, size, num_classes):
    from sceneparse.engine.metrics import ConfusionMatrix

    model.eval()
    net = _prepare(model, variant)
    x = _input(batch, size, device, variant)
    gen = torch.Generator().manual_seed(2)
    y = torch.randint(0, num_classes, (batch, *size), generator=gen).to(device)
    cm = ConfusionMatrix(num_classes, device=device)

    def forward():
        with torch.no_grad(), _autocast(device, variant):
            return net(x)

    if variant.cuda_graphs and not variant.compile:
        replay, logits = cuda_graph_replay(forward, device)

        def evaluate():
            replay()
            cm.update(logits.argmax(1), y)
    else:
        def evaluate():
            cm.update(forward().argmax(1), y)

    return evaluate


# ---------------------------------------------------------------------------- real data loading

def train_feed(data: dict, batch: int, size: tuple[int, int], device: torch.device, normalization, seed: int = 0):
    """The trainer's own pipeline (`engine.feed.training_feed`) over a real dataset's train split:
    random scale 0.5-2x, crops of `size`, flips; decoded by `data["workers"]` worker processes and
    augmented there or, with `data["augment_on"] == "device"`, batched on the device (the whole
    set kept there with `data["cache_in_memory"]`). Returns (train set, endless batch iterator,
    how many batches its workers hold ready: `feed.prefetched_batches`)."""
    from omegaconf import OmegaConf

    from sceneparse.engine.config import DataConfig
    from sceneparse.engine.distributed import DistInfo
    from sceneparse.engine.feed import (
        TrainBatches, build_train_set, epoch_batches_fn, prefetched_batches, training_feed)

    mean, std = normalization
    dc = OmegaConf.structured(DataConfig(
        kind=data["kind"], root=data["root"], crop_size=list(size), scale_range=[0.5, 2.0], flip=True,
        batch_size=batch, num_workers=int(data.get("workers", 4)), batching="crop",
        augment_on=data.get("augment_on", "workers"), cache_in_memory=bool(data.get("cache_in_memory")),
        mean=list(mean), std=list(std),
    ))
    train_set = build_train_set(dc)
    if len(train_set) < batch:
        raise SceneparseError(f"the dataset at {data['root']} has {len(train_set)} training images, "
                              f"fewer than one batch of {batch}", "lower --batch")
    sampler = TrainBatches(epoch_batches_fn(train_set, dc, seed, DistInfo(device=device)), seed, iterations=2**40)
    return train_set, training_feed(train_set, sampler, dc, device, train_set.num_classes), prefetched_batches(dc)


def _train_data_fn(model, variant, device, feed, settings):
    trainer = _Trainer(model, variant, device, settings.lr, settings.deepsup_weight)

    def step():
        images, target, _ = next(feed)  # normalised, on the device
        if variant.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        trainer.step(images, target)

    return step


# ------------------------------------------------------------------------------------- the run

def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def _labels(output) -> torch.Tensor:
    """Class map of an inference output, on the CPU (int32: 4 bytes a pixel)."""
    return _split_output(output)[0].argmax(1).to(torch.int32).cpu()


def run_benchmark(model: nn.Module, num_classes: int, settings: BenchSettings,
                  device: torch.device, normalization=None, log: Callable[[str], None] = print,
                  progress: Callable[[dict], None] | None = None) -> dict:
    """Run every (variant, task) pair on fresh copies of `model` and return the JSON-ready report.
    `progress(report)` gets the report so far after each row (e.g. to save partial results)."""
    unknown = set(settings.tasks) - set(TASKS)
    if unknown:
        raise SceneparseError(f"unknown bench task(s): {', '.join(sorted(unknown))}",
                              f"choose from {', '.join(TASKS)}")
    if any(t in settings.tasks for t in ("train", "train-data")) and settings.batch < 2:
        raise SceneparseError("training benchmarks need --batch >= 2 (BatchNorm over one image "
                              "fails in pooled decoder branches)", "raise --batch")
    for task in ("train-data", "data"):
        if task in settings.tasks and not settings.data:
            raise SceneparseError(f"task {task} needs a dataset", "pass --data ROOT")
    if any(v.cuda_graphs for v in settings.variants) and device.type != "cuda":
        raise SceneparseError("--cuda-graphs needs a CUDA device", "drop --cuda-graphs on CPU")
    if normalization is None:
        normalization = (IMAGENET_MEAN, IMAGENET_STD)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune convolutions (in warm-up)

    feed, queue = None, 0
    if "train-data" in settings.tasks or "data" in settings.tasks:
        train_set, feed, queue = train_feed(settings.data, settings.batch, settings.size, device, normalization)
        data_classes = train_set.num_classes
        if data_classes != num_classes:
            raise SceneparseError(
                f"the model predicts {num_classes} classes but the {settings.data['kind']} data at "
                f"{settings.data['root']} has {data_classes}",
                f"pass --num-classes {data_classes} (or a model trained on that dataset)",
            )

    rows: list[Row] = []
    baseline: dict[str, float] = {}
    baseline_labels: dict[str, torch.Tensor] = {}
    meta = _meta(model, num_classes, settings, device)
    # Rows fed by the pipeline: the batches its workers made while other rows ran are taken untimed
    # first, and at least twice that many are timed, so the pipeline's own speed is what counts.
    data_iters = max(settings.iters, -(-2 * queue // settings.repeats))
    if feed is not None:
        meta["data"] = {**settings.data, "prefetched_batches": queue, "timed_batches": data_iters * settings.repeats}

    def report() -> dict:
        return {"format": FORMAT, "meta": meta, "results": [asdict(r) for r in rows]}

    fn = None
    for variant in settings.variants:
        for task in settings.tasks:
            batch = 1 if task == "latency" else settings.batch
            row = Row(task=task, variant=variant.name, batch=batch)
            if task == "data" and variant != settings.variants[0]:
                continue  # no model: the variants do not change it
            if task in ("train", "train-data") and variant.cuda_graphs and not variant.compile:
                row.note = "skipped: CUDA graphs without --compile are inference-only here"
                rows.append(row)
                continue
            log(f"bench: {task} {variant.name} batch {batch} ...")
            # The previous row's closure holds its model, optimizer state, inputs and CUDA graph:
            # free them first, or they count in this row's peak memory.
            fn = None
            gc.collect()
            net = copy.deepcopy(model).to(device) if task != "data" else None
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                if task in ("latency", "throughput"):
                    fn = _inference_fn(net, variant, device, batch, settings.size)
                elif task == "train":
                    fn = _train_fn(net, variant, device, batch, settings.size, num_classes, settings)
                elif task == "eval":
                    fn = _eval_fn(net, variant, device, batch, settings.size, num_classes)
                elif task == "train-data":
                    fn = _train_data_fn(net, variant, device, feed, settings)
                else:
                    fn = functools.partial(next, feed)
                if task in ("train-data", "data"):
                    for _ in range(queue):
                        next(feed)
                    seconds = measure(fn, device, settings.warmup, data_iters, settings.repeats)
                else:
                    seconds = measure(fn, device, settings.warmup, settings.iters, settings.repeats)
                # Read before the agreement pass below allocates anything.
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                labels = _labels(fn()) if task in ("latency", "throughput") else None
            except SceneparseError:
                raise
            except Exception as err:  # e.g. torch.compile without a working compiler: report, go on
                row.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                rows.append(row)
                log(f"bench: {task} {variant.name}: {row.note}")
                if progress is not None:
                    progress(report())
                continue
            finally:
                del net
            row.ms_per_iter = seconds * 1000
            row.images_per_s = batch / seconds
            row.peak_mem_mib = peak
            if variant == Variant():
                baseline[task] = row.images_per_s
                if labels is not None:
                    baseline_labels[task] = labels
            elif labels is not None and task in baseline_labels:
                row.agreement = (labels == baseline_labels[task]).float().mean().item()
            if task in baseline:
                row.speedup = row.images_per_s / baseline[task]
            rows.append(row)
            if progress is not None:
                progress(report())
        if variant.compile:
            fn = None
            torch.compiler.reset()  # free compiled graphs (and CUDA graph pools) before the next variant

    return report()


def _meta(model: nn.Module, num_classes: int, settings: BenchSettings, device: torch.device) -> dict:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        # fp32 convolutions on CUDA use TF32 tensor cores when cuDNN allows it (torch's default)
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "model": dict(getattr(model, "config", {}) or {}),
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_classes": num_classes,
        "size": list(settings.size),
        "batch": settings.batch,
        "warmup": settings.warmup,
        "iters": settings.iters,
        "repeats": settings.repeats,
        "data": settings.data,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    """The results as a fixed-width text table (rows without numbers show their note)."""
    header = ["task", "variant", "batch", "ms/iter", "img/s", "vs fp32", "peak MiB", "agree %"]
    cells = []
    for r in report["results"]:
        row = [r["task"], r["variant"], str(r["batch"])]
        if r["note"]:
            row.append(r["note"])
        else:
            row += [_fmt(r["ms_per_iter"], ".1f"), _fmt(r["images_per_s"], ".2f"),
                    "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                    _fmt(r["peak_mem_mib"], ".0f"),
                    _fmt(None if r.get("agreement") is None else 100 * r["agreement"], ".2f")]
        cells.append(row)
    widths = [max([len(h)] + [len(c[i]) for c in cells if len(c) == len(header)])
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
    meta = report["meta"]
    lines.append(f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
                 f"{meta['size'][0]}x{meta['size'][1]}, median of {meta['repeats']} repeats of "
                 f"{meta['iters']} iterations after {meta['warmup']} warm-up")
    return "\n".join(lines)


def check_json_path(path: str | Path) -> None:
    """Refuse a folder given as the JSON file (before any measurement, not after)."""
    if Path(path).is_dir():
        raise SceneparseError(f"cannot write the benchmark results to {path}: it is a folder",
                              f"give a file name, e.g. --json {Path(path) / 'bench.json'}")


def write_json(report: dict, path: str | Path) -> None:
    path = Path(path)
    check_json_path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # rewritten after every row: never leave half a file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
    except OSError as err:
        raise SceneparseError(f"cannot write the benchmark results to {path}: {err.strerror or err}",
                              "choose a writable --json path") from None
