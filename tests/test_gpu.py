"""The CUDA-only code paths, briefly, on one GPU: autocast (bf16, fp16 + GradScaler), fused SGD,
channels-last, torch.compile, CUDA-graph inference (bench's own capture, and the Predictor's through
compile), DDP + SyncBatchNorm over NCCL (one process: one GPU cannot host two NCCL ranks), pinned
memory and non-blocking copies (no host sync per training step), bench's synchronised timing and
peak memory, Predictor and checkpoints on CUDA.

Run on a GPU machine by `benchmarks/gpu/smoke.sh`. Without CUDA every test here skips, saying
why, except the CPU check of the SyncBatchNorm conversion (it decides what DDP runs on GPUs).
Tiny models and the built-in synthetic scenes: the whole file takes a few minutes, most of it
torch.compile.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from sceneparse.engine import distributed as D
from sceneparse.models import build_model
from test_speed_paths import predict_all, trained  # noqa: F401 - a tiny model that learnt colours -> classes

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU, none here: run benchmarks/gpu/smoke.sh on a GPU machine")
TINY_BENCH = ["--encoder", "timm:test_resnet", "--decoder", "c1_deepsup", "--num-classes", "3",
              "--size", "64", "64", "--batch", "2", "--warmup", "2", "--iters", "2", "--repeats", "1",
              "--device", "cuda"]


def tiny_config(tmp_path, *overrides):
    from test_train import tiny_config as cpu_tiny_config  # the CPU tests' tiny synthetic run

    return cpu_tiny_config(tmp_path, "train.device=cuda", *overrides)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------- SyncBatchNorm (CPU)

def test_sync_batchnorm_keeps_timm_norm_act_layers():
    """torch's converter would turn MobileNetV2's BatchNormAct2d into a SyncBatchNorm that never
    calls its ReLU6; ours keeps the activation (eval mode runs on the CPU too)."""
    torch.manual_seed(0)
    model = build_model("mobilenetv2dilated", "c1", 3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        synced = D.sync_batchnorm(copy.deepcopy(model)).eval()
        out = synced(x)
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    torch.testing.assert_close(out, plain)
    assert set(synced.state_dict()) == set(model.state_dict())  # checkpoints load into plain models


# ------------------------------------------------------------------------------------ training

@needs_cuda
@pytest.mark.parametrize("amp, channels_last", [("bf16", True), ("fp16", True), ("none", False)])
def test_training_on_cuda(tmp_path, amp, channels_last):
    """The real loop: autocast, GradScaler (fp16 only), fused SGD, pinned non-blocking batches."""
    from sceneparse.engine.checkpoint import load_model
    from sceneparse.engine.train import train

    result = train(tiny_config(tmp_path, f"train.amp={amp}", f"train.channels_last={channels_last}"))
    run = tmp_path / "run"
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert result["iterations"] == 12 and all(math.isfinite(v) for v in losses)
    if amp != "fp16":  # fp16 skips its first steps while GradScaler finds its scale
        assert losses[-1] < losses[0]
    state = torch.load(run / "last.pt", weights_only=True)["train_state"]
    assert all(g["fused"] for g in state["optimizer"]["param_groups"])
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0  # the scaler ran (and saved its scale)
    else:
        assert not state["scaler"]  # disabled: nothing to save
    assert "cuda" in state["rng"]
    model = load_model(run / "last.pt", device="cuda")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, device="cuda")).isfinite().all()


@needs_cuda
def test_compiled_training_on_cuda(tmp_path):
    from sceneparse.engine.train import train

    cfg = tiny_config(tmp_path, "train.compile=true", "train.amp=bf16", "train.channels_last=true",
                      "data.crop_size=64", "data.batching=crop")  # fixed shapes: one compilation
    result = train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert result["iterations"] == 12 and all(math.isfinite(v) for v in losses)
    assert result["best_miou"] is not None


def _feed_overrides() -> list[list[str]]:
    """The ways the loop can be fed: DataLoader workers; when this version of the trainer has it,
    device augmentation of batches the workers decode, and of the training set kept on the device."""
    from sceneparse.engine.config import default_config

    crops = ["data.crop_size=64", "data.batching=crop"]  # fixed shapes: cuDNN tunes once
    feeds = [crops]
    if "augment_on" in default_config().data:
        feeds += [[*crops, "data.augment_on=device"], [*crops, "data.augment_on=device", "data.cache_in_memory=true"]]
    return feeds


@needs_cuda
@pytest.mark.parametrize("feed", _feed_overrides(),
                         ids=lambda f: ("device-resident" if "data.cache_in_memory=true" in f
                                        else "device-augment" if "data.augment_on=device" in f else "workers"))
def test_training_steps_do_not_sync_with_the_host(tmp_path, feed):
    """A host sync per step starves the GPU. The loop syncs once per log window and checkpoint by
    design; with both at the end of the run, 4 and 12 iterations must sync equally often."""
    from sceneparse.engine.train import train

    def count(iterations: int) -> list[str]:
        cfg = tiny_config(tmp_path / str(iterations), f"train.iterations={iterations}", "train.val_every=0",
                          f"train.log_every={iterations}", f"train.checkpoint_every={iterations}",
                          "train.amp=bf16", *feed)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return [f"{Path(w.filename).name}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]

    short, long = count(4), count(12)
    extra = sorted(set(long) - set(short)) or sorted(long)
    assert len(long) == len(short), f"{len(long) - len(short)} more host syncs in 8 more steps, at {extra}"


@needs_cuda
def test_losses_on_cuda_equal_the_cpu_without_host_syncs():
    from sceneparse.engine.losses import CombinedLoss, FocalLoss, LovaszSoftmaxLoss, OhemCrossEntropy, SoftDiceLoss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 32, 48, generator=gen)
    target = torch.randint(0, 5, (2, 32, 48), generator=gen)
    target[:, :4] = 255
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 3.0])
    losses = [OhemCrossEntropy(0.7, 500, weight), FocalLoss(2.0, weight),
              CombinedLoss(OhemCrossEntropy(0.7, 500), SoftDiceLoss(weight), 0.5),
              LovaszSoftmaxLoss(weight), CombinedLoss(FocalLoss(2.0), lovasz=LovaszSoftmaxLoss(), lovasz_weight=0.5)]
    for loss in losses:
        expected = loss(logits, target)
        on_gpu = loss.cuda()
        x = logits.cuda().bfloat16().requires_grad_()
        torch.cuda.set_sync_debug_mode("error")  # a .item() or a data-dependent shape would raise
        try:
            value = on_gpu(x, target.cuda())
            value.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        bf16_on_cpu = loss.cpu()(logits.bfloat16().float(), target)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.cpu(), bf16_on_cpu, rtol=1e-4, atol=1e-5)
        assert abs(value.item() - expected.item()) < 0.05 * abs(expected.item()) + 1e-3  # bf16 rounding of logits


@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_bench_train_step_does_not_sync_with_the_host(amp):
    """Fused SGD takes GradScaler's scale and inf check as tensors: no sync in the step."""
    from sceneparse.engine.bench import BenchSettings, Variant, _train_fn

    device = torch.device("cuda")
    model = build_model("timm:test_resnet", "ppm_deepsup", 3).to(device)
    step = _train_fn(model, Variant(amp=amp, channels_last=True), device, 2, (64, 64), 3, BenchSettings())
    step(), step()  # lazy initialisation (cuDNN, the scaler's tensors) may sync: not in the loop
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(), step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(p.isfinite().all() for p in model.parameters())


@needs_cuda
def test_device_augment_on_cuda_equals_the_cpu():
    """On CUDA the resampling products run in float16: within one grey level of the CPU's float32
    (the rounding bound is about a third of one, before the jitter's factors), masks identical."""
    from sceneparse.data.device_augment import DeviceAugment

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 90, 120), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, 11, (4, 90, 120), dtype=torch.uint8, generator=g)
    sizes, seeds = [(90, 120), (80, 100), (90, 64), (45, 60)], [3, 4, 5, 6]
    augment = DeviceAugment((72, 96), (0.5, 2.0), flip=True, jitter=0.2, mean=(0, 0, 0), std=(1, 1, 1))
    cpu_out, cpu_label = augment(images, masks, sizes, seeds)
    out, label = augment(images.cuda(), masks.cuda(), sizes, seeds)
    assert torch.equal(label.cpu(), cpu_label)
    assert (out.cpu() - cpu_out).abs().max() < 1 / 255


# --------------------------------------------------------------------- DDP, SyncBN, NCCL

@needs_cuda
def test_ddp_syncbn_and_nccl_in_one_process(tmp_path):
    """`torchrun --nproc-per-node 1` running `worker()` below: a one-process NCCL group, so
    wrap_model makes DDP + SyncBatchNorm and `sceneparse train` runs every collective on NCCL."""
    from test_distributed import launch_torchrun

    launch_torchrun([__file__, tmp_path], nproc=1, timeout=300, NCCL_DEBUG="WARN")
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["backend"] == "nccl" and r["wrapped"] == "DistributedDataParallel"
    assert r["plain_bn"] == [] and "SyncBatchNormAct" in r["bn_types"]
    assert r["eval_max_diff"] < 1e-3  # same function as the unconverted model
    assert r["all_reduce"] == 3.0 and r["gathered"] == [{"rank": 0}]
    assert r["train"]["iterations"] == 12 and r["train"]["best_miou"] is not None
    assert r["group_kept"] and r["reloaded"]


def worker(out_dir: Path) -> None:
    """One torchrun process: its own NCCL group of one, then the library's distributed paths."""
    import torch.distributed as dist

    from sceneparse.engine.checkpoint import load_model
    from sceneparse.engine.train import train

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    info = D.init_from_env("cuda")
    result = {"backend": dist.get_backend()}

    torch.manual_seed(0)
    model = build_model("mobilenetv2dilated", "c1_deepsup", 3).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(model).cuda().eval()
    wrapped = D.wrap_model(model, info)
    result["wrapped"] = type(wrapped).__name__
    bns = [m for m in wrapped.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    result["bn_types"] = sorted({type(m).__name__ for m in bns})
    result["plain_bn"] = sorted({type(m).__name__ for m in bns if not isinstance(m, nn.SyncBatchNorm)})
    x = torch.randn(4, 3, 64, 64, device=info.device).contiguous(memory_format=torch.channels_last)
    wrapped.eval()  # before any training step changes the BatchNorm statistics
    with torch.no_grad():
        result["eval_max_diff"] = (wrapped(x) - plain(x)).abs().max().item()
    wrapped.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = wrapped(x)
    (out.logits.float().mean() + out.aux.float().mean()).backward()

    result["all_reduce"] = D.all_reduce_(torch.tensor([3.0], device=info.device)).item()
    result["gathered"] = D.all_gather_object(D.broadcast_object({"rank": info.rank}))
    D.broadcast_buffers(wrapped)

    cfg = tiny_config(out_dir, "train.amp=bf16", "train.channels_last=true")
    train_result = train(cfg)  # timm:test_efficientnet: BatchNormAct2d layers, converted
    result["train"] = {k: train_result[k] for k in ("iterations", "best_miou")}
    result["group_kept"] = D.is_initialized()
    result["reloaded"] = load_model(out_dir / "run" / "last.pt") is not None  # strict load, plain BN
    (out_dir / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------- inference

@needs_cuda
def test_cuda_graph_inference_equals_eager():
    from sceneparse.engine.bench import cuda_graph_replay

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("timm:test_resnet", "ppm_deepsup", 5).to(device, memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(x)

    replay, output = cuda_graph_replay(forward, device)
    for seed in (1, 2):  # new data in the captured input tensor, then replay
        x.copy_(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
        replay()
        eager = forward()
        torch.testing.assert_close(output, eager, rtol=2e-2, atol=2e-2)
        assert (output.argmax(1) == eager.argmax(1)).float().mean() >= 0.995


@needs_cuda
def test_measure_waits_for_the_gpu():
    from sceneparse.engine.bench import measure

    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is not in this torch")
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    stop.record()
    torch.cuda.synchronize()
    kernel_s = start.elapsed_time(stop) / 1000
    seconds = measure(lambda: torch.cuda._sleep(20_000_000), torch.device("cuda"), 1, 3, 2)
    assert seconds >= 0.8 * kernel_s  # launches return at once: only a synchronised clock sees this


@needs_cuda
def test_bench_cuda_paths(tmp_path):
    from sceneparse.cli.main import main

    out = tmp_path / "bench.json"
    variants = "fp32-eager,bf16+channels-last,fp16+channels-last,bf16+channels-last+cuda-graphs"
    assert main(["bench", *TINY_BENCH, "--tasks", "latency,throughput,train,eval",
                 "--variants", variants, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["device_name"] == torch.cuda.get_device_name()
    for r in report["results"]:
        if r["task"] == "train" and r["variant"].endswith("cuda-graphs"):
            assert r["note"].startswith("skipped")
            continue
        assert r["note"] is None, r
        assert r["ms_per_iter"] > 0 and r["peak_mem_mib"] > 0
        inference = r["task"] in ("latency", "throughput") and r["variant"] != "fp32-eager"
        assert (r["agreement"] is not None) == inference and 0 <= (r["agreement"] or 0) <= 1


@needs_cuda
def test_bench_compile_paths(tmp_path):
    """torch.compile, alone and with CUDA graphs (mode reduce-overhead), inference and training."""
    from sceneparse.cli.main import main

    out = tmp_path / "bench.json"
    assert main(["bench", *TINY_BENCH, "--tasks", "latency,train",
                 "--variants", "bf16+channels-last+compile,bf16+channels-last+compile+cuda-graphs",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 6 and all(r["note"] is None for r in rows), rows
    assert all(r["agreement"] is not None for r in rows if r["task"] == "latency" and r["variant"] != "fp32-eager")


@needs_cuda
@pytest.mark.parametrize("amp, channels_last", [(None, False), (torch.bfloat16, True), (torch.float16, True)])
def test_predictor_on_cuda_agrees_with_cpu(trained, amp, channels_last):
    from sceneparse.engine.infer import Predictor

    model, images, _ = trained
    probs_cpu, pred_cpu = predict_all(Predictor(copy.deepcopy(model)), images)
    predictor = Predictor(copy.deepcopy(model), device="cuda", amp_dtype=amp, channels_last=channels_last)
    probs, pred = predict_all(predictor, images)
    assert probs.device.type == "cuda"
    assert (pred.cpu() == pred_cpu).float().mean() >= 0.995
    if amp is None:  # TF32 convolutions: close, not equal
        torch.testing.assert_close(probs.cpu(), probs_cpu, rtol=1e-2, atol=1e-2)


@needs_cuda
def test_predictor_windows_and_stripes_on_cuda(trained):
    """Sliding windows (grid cached per device) and banded argmax, on CUDA as on the CPU."""
    from sceneparse.engine.infer import Predictor

    model, images, _ = trained
    image = torch.cat([images[0], images[1]], dim=-1)  # 32 x 64
    opts = {"window": 32, "window_overlap": 0.5, "max_prob_bytes": 8192}  # < 3 x 32 x 64 floats
    cpu = Predictor(copy.deepcopy(model), **opts).predict(image)
    gpu = Predictor(copy.deepcopy(model), device="cuda", **opts).predict(image)
    assert gpu.device.type == "cuda" and (gpu.cpu() == cpu).float().mean() >= 0.995


@needs_cuda
def test_predictor_compiled_with_cuda_graphs_equals_eager(trained):
    """compile="reduce-overhead" (`--compile --cuda-graphs`): one CUDA graph per input size. The
    sliding windows and the flip replay the same graph several times for one image: each
    replay's logits must be kept (copied) before the next one overwrites them."""
    from sceneparse.engine.infer import Predictor

    model, images, _ = trained
    image = torch.cat([images[0], images[1]], dim=-1)  # 32 x 64: three 32 x 32 windows
    opts = {"device": "cuda", "window": 32, "window_overlap": 0.5, "flip": True}
    eager = Predictor(copy.deepcopy(model), **opts)
    graphs = Predictor(copy.deepcopy(model), compile="reduce-overhead", **opts)
    for _ in range(3):  # the first runs record the graph, the later ones replay it
        torch.testing.assert_close(graphs.probabilities(image), eager.probabilities(image), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(graphs.probabilities(images[2]), eager.probabilities(images[2]), rtol=1e-3, atol=1e-4)


@needs_cuda
def test_checkpoint_round_trip_from_cuda_channels_last(tmp_path):
    from sceneparse.engine.checkpoint import load_model, rng_state, save_model, set_rng_state

    torch.manual_seed(0)
    model = build_model("timm:test_resnet", "c1", 3).cuda().to(memory_format=torch.channels_last).eval()
    save_model(tmp_path / "m.pt", model, ["a", "b", "c"], [[0, 0, 0]] * 3)
    loaded = load_model(tmp_path / "m.pt", device="cuda")
    x = torch.randn(1, 3, 64, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-3, atol=1e-3)
    state = rng_state()
    first = torch.rand(4, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)


# ------------------------------------------------------------------------- every decoder on CUDA

@needs_cuda
@pytest.mark.parametrize("decoder", ["fcn8s", "deeplabv3plus", "danet", "denseaspp", "encnet", "bisenet", "upernet",
                                     "unet", "unetplusplus", "linknet", "fpn", "segformer", "ocrnet"])
def test_every_head_trains_a_step_and_predicts_in_bf16_channels_last(decoder):
    """One fused-SGD step under bf16 autocast and channels-last, then eval-mode logits in bf16 that
    agree with fp32 (random weights: near-ties are many, so the bar is 98 % of pixels, not the
    99.5 % of a trained model). DANet's and EncNet's sums over positions are the likeliest to
    overflow or drift in reduced precision; OCRNet's attention makes its map channels-last
    inside an NCHW model (sceneparse/models/layers.py)."""
    torch.manual_seed(0)
    model = build_model("resnet18dilated", decoder, num_classes=5).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    x = torch.randn(2, 3, 96, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 5, (2, 96, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.train()(x)
        logits = out.logits if hasattr(out, "logits") else out
        loss = nn.functional.cross_entropy(logits.float(), target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x)
    assert torch.isfinite(bf16).all()
    assert (bf16.argmax(1) == fp32.argmax(1)).float().mean() > 0.98


if __name__ == "__main__":  # run by torchrun from test_ddp_syncbn_and_nccl_in_one_process
    worker(Path(sys.argv[1]))
