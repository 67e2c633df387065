"""`sceneparse bench` on CPU with a tiny model: the table, the JSON report, the ratios, the errors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from sceneparse.cli.main import main
from sceneparse.engine.bench import Variant, explicit_variants, measure, parse_variant, variants_for
from sceneparse.errors import SceneparseError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CAMVID = SHARED / "data" / "camvid"
TINY = ["--encoder", "timm:test_resnet", "--decoder", "c1", "--size", "32", "32", "--batch", "2",
        "--warmup", "1", "--iters", "1", "--repeats", "2", "--device", "cpu"]



def test_measure_counts_warmup_and_takes_the_median():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01)

    seconds = measure(fn, torch.device("cpu"), warmup=2, iters=2, repeats=3)
    assert len(calls) == 2 + 2 * 3
    assert 0.01 <= seconds < 0.05  # per call, not per repeat


def test_variants_are_baseline_each_option_and_the_combination():
    assert variants_for() == [Variant()]
    names = [v.name for v in variants_for(amp="bf16", channels_last=True, compile=True)]
    assert names == ["fp32-eager", "bf16", "fp32+channels-last", "fp32+compile", "bf16+channels-last+compile"]
    assert [v.name for v in variants_for(amp="fp16")] == ["fp32-eager", "fp16"]


def test_variant_names_parse_back_and_typos_are_refused():
    every = [Variant(amp, cl, comp, graphs) for amp in (None, "bf16", "fp16") for cl in (False, True)
             for comp in (False, True) for graphs in (False, True)]
    assert all(parse_variant(v.name) == v for v in every)
    for bad in ("bf16+compile+channels-last", "fp32", "bf16+cudagraphs", "int8", "bf16+compile+compile"):
        with pytest.raises(SceneparseError):
            parse_variant(bad)
    chosen = explicit_variants(["bf16+channels-last", "fp32-eager", "bf16+channels-last"])
    assert [v.name for v in chosen] == ["fp32-eager", "bf16+channels-last"]  # baseline first, once


def test_explicit_variants_report_agreement_and_save_every_row(tmp_path, monkeypatch):
    from sceneparse.engine import bench

    out, writes = tmp_path / "bench.json", []
    real_write = bench.write_json
    monkeypatch.setattr(bench, "write_json", lambda report, path: (writes.append(len(report["results"])),
                                                                   real_write(report, path)))
    assert main(["bench", *TINY, "--num-classes", "3", "--tasks", "latency,throughput,train",
                 "--variants", "fp32+channels-last", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["task"], r["variant"]) for r in rows] == [
        (t, v) for v in ("fp32-eager", "fp32+channels-last") for t in ("latency", "throughput", "train")]
    assert writes == [1, 2, 3, 4, 5, 6, 6]  # after each row, then the final report
    for r in rows:  # inference rows of a speed variant: share of pixels predicted as fp32 eager does
        expected = r["task"] != "train" and r["variant"] != "fp32-eager"
        assert (r["agreement"] is not None) == expected
        assert r["agreement"] is None or r["agreement"] > 0.99  # channels-last on the CPU: same maths
    assert not list(tmp_path.glob(".*.tmp"))


def test_make_table_shows_agreement_and_the_end_to_end_ratio(tmp_path):
    import subprocess
    import sys

    def row(task, variant, ips, agreement=None):
        return {"task": task, "variant": variant, "batch": 16, "ms_per_iter": 16000 / ips, "images_per_s": ips,
                "speedup": None, "peak_mem_mib": 100.0, "agreement": agreement, "note": None}

    report = {"format": "sceneparse-bench/1",
              "meta": {"model_name": "m", "model": {}, "device": "cuda:0", "device_name": "GPU", "torch": "x",
                       "size": [512, 512], "date": "2026-11-22T00:00:00+00:00"},
              "results": [row("train", "bf16", 200.0), row("train-data", "bf16", 190.0),
                          row("throughput", "bf16", 900.0, 0.9987)]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    text = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_table.py"), str(path)],
                          capture_output=True, text=True, check=True).stdout
    assert "| 99.87 |" in text
    assert "end-to-end 190.0 img/s = 95 % of the synthetic-tensor step (200.0 img/s)" in text


def test_bench_variants_replace_the_option_flags(capsys):
    args = ["bench", *TINY, "--num-classes", "3", "--amp", "bf16", "--variants", "bf16"]
    assert main(args) == 2 and "--variants replaces" in capsys.readouterr().err
    assert main(["bench", *TINY, "--num-classes", "3", "--variants", "bf16+turbo"]) == 2
    assert "unknown bench variant" in capsys.readouterr().err


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--num-classes", "3", "--amp", "bf16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["format"] == "sceneparse-bench/1"
    meta = report["meta"]
    assert meta["device"] == "cpu" and meta["size"] == [32, 32] and meta["batch"] == 2
    assert meta["model"] == {"encoder": "timm:test_resnet", "decoder": "c1", "num_classes": 3}
    rows = report["results"]
    assert [(r["task"], r["variant"], r["batch"]) for r in rows] == [
        (task, variant, 1 if task == "latency" else 2)
        for variant in ("fp32-eager", "bf16")
        for task in ("latency", "throughput", "train", "eval")
    ]
    baseline = {r["task"]: r for r in rows if r["variant"] == "fp32-eager"}
    for r in rows:
        assert r["note"] is None, r
        assert r["ms_per_iter"] > 0 and r["peak_mem_mib"] is None  # no CUDA: no GPU memory
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_iter"])
        assert r["speedup"] == pytest.approx(r["images_per_s"] / baseline[r["task"]]["images_per_s"])
    table = capsys.readouterr().out
    assert "fp32-eager" in table and "bf16" in table and "1.00x" in table


def test_bench_json_path_that_is_a_folder_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    from sceneparse.engine import bench as bench_mod

    monkeypatch.setattr(bench_mod, "run_benchmark", lambda *a, **k: pytest.fail("measured before the check"))
    assert main(["bench", *TINY, "--num-classes", "3", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the benchmark results to {tmp_path}: it is a folder" in err and "Traceback" not in err


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"../shared not found: {CAMVID} (real CamVid data)")
@pytest.mark.parametrize("pipeline", [["--workers", "1"], ["--workers", "0", "--augment-on", "device", "--cache-in-memory"]],
                         ids=["workers", "on-device"])
def test_bench_trains_from_real_data(tmp_path, pipeline):
    out = tmp_path / "bench.json"
    args = ["bench", *TINY, "--num-classes", "11", "--tasks", "train-data", "--data", str(CAMVID),
            *pipeline, "--json", str(out)]
    assert main(args) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["task"] == "train-data" and row["note"] is None and row["images_per_s"] > 0


@pytest.mark.parametrize("extra, message", [
    ([], "no model given"),
    (["--encoder", "timm:test_resnet", "--decoder", "c1", "--cuda-graphs"], "CUDA"),
    (["--encoder", "timm:test_resnet", "--decoder", "c1", "--batch", "1"], "--batch >= 2"),
    (["--encoder", "timm:test_resnet", "--decoder", "c1", "--tasks", "train-data"], "--data"),
    (["--encoder", "timm:test_resnet", "--decoder", "c1", "--tasks", "speed"], "unknown bench task"),
])
def test_bench_user_errors(extra, message, capsys):
    if "--cuda-graphs" in extra and torch.cuda.is_available():
        pytest.skip("checks the no-CUDA message")
    assert main(["bench", "--size", "32", "32", "--device", "cpu", *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"../shared not found: {CAMVID} (real CamVid data)")
def test_bench_refuses_class_count_mismatch_with_data(capsys):
    args = ["bench", *TINY, "--num-classes", "3", "--tasks", "train-data", "--data", str(CAMVID), "--workers", "0"]
    assert main(args) == 2
    assert "--num-classes 11" in capsys.readouterr().err


def test_bench_data_that_is_no_folder_says_so(tmp_path, capsys):
    assert main(["bench", *TINY, "--tasks", "train-data", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'nope'}: no such folder" in err and "--data-kind" not in err


ADE_SAMPLES = SHARED / "data" / "ade20k_samples"


@pytest.mark.skipif(not ADE_SAMPLES.is_dir(), reason=f"../shared not found: {ADE_SAMPLES} (real ADE20K samples)")
def test_ade_sized_data_has_the_listed_sizes_and_feeds_the_benchmark(tmp_path):
    import importlib.util

    import numpy as np
    from PIL import Image

    from sceneparse.data import build_dataset

    spec = importlib.util.spec_from_file_location("make_ade_sized", ROOT / "benchmarks" / "make_ade_sized.py")
    make_ade_sized = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_ade_sized)
    odgt = tmp_path / "training.odgt"
    listed = {(683, 512), (512, 768), (256, 200)}  # (width, height)
    odgt.write_text("".join(json.dumps({"fpath_img": "a.jpg", "fpath_segm": "a.png", "width": w, "height": h}) + "\n"
                            for w, h in sorted(listed)))
    make_ade_sized.make(ADE_SAMPLES, odgt, tmp_path / "ade", count=7, workers=1)

    dataset = build_dataset({"kind": "ade20k", "root": str(tmp_path / "ade")}, "train")
    assert len(dataset) == 7
    assert {(w, h) for h, w in dataset.image_sizes()} <= listed
    # labels are resized by nearest neighbour: only values of the source annotation appear
    source = np.array(Image.open(sorted((ADE_SAMPLES / "annotations").glob("*.png"))[0]))
    made = np.array(Image.open(sorted((tmp_path / "ade").rglob("*.png"))[0]))
    assert set(np.unique(made)) <= set(np.unique(source))

    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--num-classes", "150", "--tasks", "train-data", "--data", str(tmp_path / "ade"),
                 "--data-kind", "ade20k", "--workers", "0", "--augment-on", "device", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["task"] == "train-data" and row["note"] is None and row["images_per_s"] > 0


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"../shared not found: {CAMVID} (real CamVid data)")
def test_data_task_times_the_pipeline_alone_once(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--num-classes", "11", "--tasks", "data,train-data", "--data", str(CAMVID),
                 "--workers", "1", "--variants", "fp32-eager,fp32+channels-last", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["task"], r["variant"]) for r in rows] == [
        ("data", "fp32-eager"), ("train-data", "fp32-eager"), ("train-data", "fp32+channels-last")]
    assert all(r["note"] is None and r["images_per_s"] > 0 for r in rows)


def test_pipeline_rows_drain_the_workers_queue_before_timing(monkeypatch):
    """Workers keep batches ready while other rows run; a pipeline row must take those untimed, then
    time at least twice as many, or it measures a full queue instead of the pipeline."""
    from sceneparse.engine import bench
    from sceneparse.models import build_model

    served = []

    class TrainSet:
        num_classes = 3

        def __len__(self):
            return 100

    def batches():
        while True:
            served.append(len(served))
            yield torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long), []

    monkeypatch.setattr(bench, "train_feed", lambda *args, **kwargs: (TrainSet(), batches(), 6))
    timed = []
    real_measure = bench.measure

    def spy(fn, device, warmup, iters, repeats):
        timed.append((len(served), warmup, iters, repeats))
        return real_measure(fn, device, warmup, iters, repeats)

    monkeypatch.setattr(bench, "measure", spy)
    settings = bench.BenchSettings(size=(8, 8), batch=2, tasks=("data",), warmup=1, iters=1, repeats=2,
                                   data={"kind": "camvid", "root": "x", "workers": 3})
    report = bench.run_benchmark(build_model("timm:test_resnet", "c1", 3), 3, settings, torch.device("cpu"))
    # the 6 ready batches taken before timing began; then 1 warm-up and 2 repeats of 6 (>= 2 x 6 timed)
    assert timed == [(6, 1, 6, 2)] and len(served) == 6 + 1 + 12
    assert report["meta"]["data"] == {"kind": "camvid", "root": "x", "workers": 3, "prefetched_batches": 6,
                                      "timed_batches": 12}


def test_the_feed_says_how_many_batches_its_workers_hold():
    from omegaconf import OmegaConf

    from sceneparse.engine.config import DataConfig
    from sceneparse.engine.feed import PREFETCH_FACTOR, prefetched_batches

    def data(**kw):
        return OmegaConf.structured(DataConfig(**kw))

    assert prefetched_batches(data(num_workers=14)) == 14 * PREFETCH_FACTOR
    assert prefetched_batches(data(num_workers=14, augment_on="device", crop_size=64)) == 14 * PREFETCH_FACTOR
    assert prefetched_batches(data(num_workers=14, augment_on="device", crop_size=64, cache_in_memory=True)) == 0
    assert prefetched_batches(data(num_workers=0)) == 0


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"../shared not found: {CAMVID} (real CamVid data)")
def test_bench_data_smaller_than_its_batch_names_the_bench_flag(capsys):
    assert main(["bench", *TINY[:7], "--batch", "400", *TINY[9:], "--num-classes", "11", "--tasks", "train-data",
                 "--data", str(CAMVID), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "367 training images, fewer than one batch of 400" in err and "lower --batch" in err
