"""`sceneparse export`: ONNX and .pt2 files give the eager model's logits (also at other sizes when
dynamic), carry the checkpoint's metadata, and the CLI's mistakes are one message with exit 2."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

import pytest
import torch

from sceneparse.cli.main import main
from sceneparse.data.transforms import normalize
from sceneparse.engine import export as export_mod
from sceneparse.engine.checkpoint import load_model, save_model
from sceneparse.engine.export import export_model, read_metadata
from sceneparse.errors import SceneparseError
from sceneparse.models import build_model

# The ONNX tests need the `export` extra (in `dev`, so CI has it); without it they skip, saying so
# (benchmarks/gpu/check_versions.sh runs the suite in a venv that lacks it).
needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="the export extra (onnx, onnxscript, onnxruntime) is not installed: pip install 'sceneparse[export]'")

NAMES = ["sky", "road", "car"]
PALETTE = [[0, 0, 255], [128, 64, 128], [255, 0, 0]]
NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}  # not ImageNet's: proves it is the checkpoint's


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "r18.pt"
    save_model(path, build_model("resnet18", "c1", 3), NAMES, PALETTE, NORM)
    return path


def eager_logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(normalize(images, NORM["mean"], NORM["std"]))


def images(n: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@needs_onnx
def test_onnx_dynamic_export_matches_eager_at_another_size_and_carries_metadata(checkpoint, tmp_path):
    import onnx
    import onnxruntime as ort

    model = load_model(checkpoint)
    path = tmp_path / "m.onnx"
    report = export_model(model, path, format="onnx", size=(64, 96), dynamic=True, log=quiet)
    assert all(check["ok"] for check in report["checks"])

    x = images(2, 45, 70)  # neither the example size nor a multiple of 32
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"image": x.numpy()})
    ref = eager_logits(model, x)
    assert out.shape == (2, 3, 45, 70)
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-4)

    # the dynamic axes carry our names, the same in the input and the output (not the exporter's `s40`)
    proto = onnx.load(str(path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    assert dims == {"image": ["batch", 3, "height", "width"], "logits": ["batch", 3, "height", "width"]}

    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["sceneparse.class_names"]) == NAMES
    assert json.loads(props["sceneparse.palette"]) == PALETTE
    meta = read_metadata(path)
    assert meta["normalization"]["mean"] == NORM["mean"] and meta["normalization"]["std"] == NORM["std"]
    assert meta["model_config"] == model.config and meta["dynamic"] is True
    assert meta["opset"] == next(o.version for o in proto.opset_import if o.domain == "")


def test_pt2_dynamic_export_matches_eager_at_another_size_and_carries_metadata(checkpoint, tmp_path):
    model = load_model(checkpoint)
    path = tmp_path / "m.pt2"
    export_model(model, path, format="pt2", size=(64, 96), dynamic=True, log=quiet)
    program = torch.export.load(path).module()
    x = images(3, 50, 77)
    with torch.no_grad():
        torch.testing.assert_close(program(x), eager_logits(model, x), rtol=1e-5, atol=1e-5)
    meta = read_metadata(path)
    assert meta["class_names"] == NAMES and meta["palette"] == PALETTE
    assert meta["input"]["dtype"] == "uint8" and meta["output"]["name"] == "logits"


def test_cli_pt2_argmax_float_input_writes_class_ids(checkpoint, tmp_path, capsys):
    path = tmp_path / "ids.pt2"
    code = main(["export", "--model", str(checkpoint), "--output", str(path), "--size", "40", "56",
                 "--argmax", "--input-dtype", "float32"])
    assert code == 0
    assert f"verified {path}" in capsys.readouterr().out
    model = load_model(checkpoint)
    x = images(1, 40, 56)
    ids = torch.export.load(path).module()(x.float())
    assert ids.dtype == torch.int64
    assert torch.equal(ids, eager_logits(model, x).argmax(dim=1))
    assert read_metadata(path)["output"]["name"] == "labels"


@pytest.mark.parametrize("height, width", [(1, 1), (2, 3), (5, 7), (6, 6), (13, 17), (64, 50)])
@pytest.mark.parametrize("cells", [1, 2, 3, 6, (2, 5)])
def test_matrix_pool_equals_torchs_adaptive_average_pool(height, width, cells):
    # sides smaller than, equal to, multiples of and coprime with the cell counts (overlapping cells)
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(height * width))
    expected = torch.nn.AdaptiveAvgPool2d(cells)(x)
    got = export_mod.MatrixAdaptiveAvgPool2d(cells)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@needs_onnx
@pytest.mark.parametrize("encoder, decoder", [("resnet18dilated", "ppm_deepsup"), ("resnet18", "upernet")])
def test_onnx_dynamic_export_of_pyramid_pooling_decoders_matches_eager_at_other_sizes(encoder, decoder, tmp_path):
    # ONNX has no adaptive pooling: without the matrix form, the pyramid's cells would be baked in
    # for the example's feature size (8 x 12 here, at output stride 8) and wrong at every other size.
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model(encoder, decoder, 3).eval()
    with torch.no_grad():  # running statistics away from 0/1, so the pyramid branches shape the output
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"{decoder}.onnx"
    export_model(model, path, format="onnx", size=(64, 96), dynamic=True, log=quiet)
    assert not any(isinstance(m, export_mod.MatrixAdaptiveAvgPool2d) for m in model.modules())  # caller's model kept
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(2, 104, 72, seed=5)  # 13 x 9 features: not the example's, and coprime with 2, 3 and 6 cells
    ours = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        expected = model(normalize(x, *export_mod._normalization(model)))  # ImageNet's: no checkpoint here
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@needs_onnx
@pytest.mark.parametrize("pool", [torch.nn.AdaptiveMaxPool2d(3), torch.nn.AdaptiveAvgPool2d((None, 3))])
def test_onnx_dynamic_with_other_adaptive_pooling_is_refused_with_the_way_out(tmp_path, pool):
    model = build_model("resnet18", "c1", 3).eval()
    model.decoder.pyramid = pool  # a user's layer with no matrix form (max, or a side kept at the input's)
    with pytest.raises(SceneparseError) as err:
        export_model(model, tmp_path / "p.onnx", format="onnx", size=(64, 64), dynamic=True, log=quiet)
    assert "decoder.pyramid" in err.value.message and "--format pt2" in err.value.hint
    assert not (tmp_path / "p.onnx").exists()


def test_a_failed_capture_is_one_line_without_the_tracers_guards(checkpoint, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("Constraints violated (height, width)!\n- Not all values of height satisfy "
                           "the generated guard ((8*((31 + L['image'].size()[2]) // 32)")

    monkeypatch.setattr(torch.export, "export", failing)
    with pytest.raises(SceneparseError) as err:
        export_model(load_model(checkpoint), tmp_path / "m.pt2", format="pt2", size=(64, 64), dynamic=True, log=quiet)
    assert err.value.message.endswith("RuntimeError: Constraints violated (height, width)!")
    assert err.value.hint == "try without --dynamic (a fixed --size)"


SMALL_SWIN = {"depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "embed_dim": 16}  # as test_ade20k_swin


@pytest.mark.parametrize("name", ["m.pt2", "m.onnx"])
def test_cli_dynamic_swin_is_refused_before_the_capture_with_the_way_out(tmp_path, capsys, monkeypatch, name):
    # torch.export fails on Swin's windows only after minutes of trying: the refusal comes first
    torch.manual_seed(0)
    model = build_model("timm:swin_tiny_patch4_window7_224", "c1", 3, encoder_options=SMALL_SWIN)
    save_model(tmp_path / "swin.pt", model, NAMES, PALETTE, NORM)
    out = tmp_path / "out" / name
    with monkeypatch.context() as patched:
        patched.setattr(torch.export, "export", lambda *a, **k: pytest.fail("torch.export tried a dynamic Swin"))
        code = main(["export", "--model", str(tmp_path / "swin.pt"), "--output", str(out), "--dynamic",
                     "--size", "64", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "timm:swin_tiny_patch4_window7_224 encoder cannot be exported with dynamic height/width" in err
    assert "--size H W, without --dynamic" in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    if name.endswith(".pt2"):  # the way out: the same model at a fixed size
        assert main(["export", "--model", str(tmp_path / "swin.pt"), "--output", str(out), "--size", "64", "64"]) == 0
        assert [p.name for p in out.parent.iterdir()] == [name]


@pytest.mark.parametrize("encoder", ["timm:swinv2_tiny_window8_256", "timm:swinv2_cr_tiny_224"])
def test_dynamic_swin_v2_is_refused_before_the_capture(tmp_path, monkeypatch, encoder):
    model = build_model(encoder, "c1", 3, encoder_options=SMALL_SWIN)
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("torch.export tried a dynamic Swin"))
    with pytest.raises(SceneparseError) as err:
        export_model(model, tmp_path / "m.pt2", format="pt2", size=(64, 64), dynamic=True, log=quiet)
    assert f"{encoder} encoder cannot be exported with dynamic height/width" in err.value.message
    assert "without --dynamic" in err.value.hint and list(tmp_path.iterdir()) == []


def _off_by_one(run):
    return lambda x: run(x) + 1.0


def _fails(run):
    def failing(x):
        raise RuntimeError("invalid index found, index = 2")  # as onnxruntime's GatherND says it

    return failing


@pytest.mark.parametrize("breaking, message", [(_off_by_one, "disagrees with the eager model"),
                                               (_fails, "fails on an input of shape")])
def test_a_broken_export_is_an_error_and_leaves_an_earlier_file_alone(checkpoint, tmp_path, monkeypatch, breaking,
                                                                       message):
    real_runner = export_mod._runner
    monkeypatch.setattr(export_mod, "_runner", lambda path, fmt: breaking(real_runner(path, fmt)))
    path = tmp_path / "bad.pt2"
    with pytest.raises(SceneparseError, match=message):
        export_model(load_model(checkpoint), path, format="pt2", size=(40, 40), log=quiet)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing staged left behind
    path.write_bytes(b"an earlier export")
    with pytest.raises(SceneparseError, match=message):
        export_model(load_model(checkpoint), path, format="pt2", size=(40, 40), log=quiet)
    assert path.read_bytes() == b"an earlier export" and list(tmp_path.iterdir()) == [path]


def test_cli_missing_model_file_is_one_message(tmp_path, capsys):
    code = main(["export", "--model", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2
    assert "checkpoint not found" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_missing_optional_dependency_names_the_extra(checkpoint, tmp_path, capsys, monkeypatch):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    code = main(["export", "--model", str(checkpoint), "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2
    assert "package 'onnx'" in err and "pip install 'sceneparse[export]'" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


@needs_onnx
@pytest.mark.parametrize("opset, message", [("17", "could not convert this model to --opset 17: it kept opset 18"),
                                            ("99", "--opset 99 is not an ONNX opset")])
def test_cli_opset_not_obtained_is_one_message(checkpoint, tmp_path, capfd, opset, message):
    # (the exporter converts down from its own opset 18; the Pad of DeployModule has no converter to 17)
    out = tmp_path / "out"
    code = main(["export", "--model", str(checkpoint), "--output", str(out / "m.onnx"), "--size", "40", "40",
                 "--opset", opset])
    err = capfd.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err  # the exporter's own logged traceback is not shown
    assert not out.exists() or list(out.iterdir()) == []


def test_pt2_is_staged_under_a_pt2_name(checkpoint, tmp_path, monkeypatch):
    # torch warns about (and may one day refuse) an archive whose name does not end in .pt2
    paths, save, load = [], torch.export.save, torch.export.load
    monkeypatch.setattr(torch.export, "save", lambda ep, f, **kw: paths.append(str(f)) or save(ep, f, **kw))
    monkeypatch.setattr(torch.export, "load", lambda f, **kw: paths.append(str(f)) or load(f, **kw))
    export_model(load_model(checkpoint), tmp_path / "m.pt2", format="pt2", size=(40, 40), log=quiet)
    assert paths and all(p.endswith(".pt2") for p in paths)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


@needs_onnx
def test_onnx_weights_side_file_is_moved_with_the_model(checkpoint, tmp_path, monkeypatch):
    # Above ~1.5 GB of weights the exporter writes them to `<file>.data`; a threshold of 0 does that here.
    try:
        program_mod = importlib.import_module("torch.onnx._internal.exporter._onnx_program")
        monkeypatch.setattr(program_mod, "_LARGE_MODEL_THRESHOLD", 0)
    except (ImportError, AttributeError):
        pytest.skip("this torch decides on external ONNX weights differently")
    path = tmp_path / "m.onnx"
    export_model(load_model(checkpoint), path, format="onnx", size=(40, 40), log=quiet)  # verified from staging
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # finds its weights
    assert session.run(None, {"image": images(1, 40, 40).numpy()})[0].shape == (1, 3, 40, 40)
    # Exported again with its weights inside: the old side file, which nothing reads now, goes.
    monkeypatch.undo()
    export_model(load_model(checkpoint), path, format="onnx", size=(40, 40), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": images(1, 40, 40).numpy()})[0].shape == (1, 3, 40, 40)


def _fail_pt2_save(program, f, **kwargs):
    raise RuntimeError(f"File {f} cannot be opened.")  # as torch.export.save says it


def _fail_onnx_save(self, destination, **kwargs):
    raise PermissionError(13, "Permission denied", str(destination))


@pytest.mark.parametrize("fmt, target, failing", [("pt2", (torch.export, "save"), _fail_pt2_save),
                                                  pytest.param("onnx", (torch.onnx.ONNXProgram, "save"), _fail_onnx_save,
                                                               marks=needs_onnx)])
def test_cli_write_error_names_the_output_not_the_staged_file(checkpoint, tmp_path, capsys, monkeypatch, fmt, target,
                                                              failing):
    monkeypatch.setattr(*target, failing)
    out = tmp_path / "out" / f"m.{fmt}"
    code = main(["export", "--model", str(checkpoint), "--output", str(out), "--size", "40", "40"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"cannot write {out}" in err and ".tmp" not in err
    assert list(out.parent.iterdir()) == []


def test_unwritable_folder_is_refused_before_the_capture(checkpoint, tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("running as root: folder permissions do not stop writes (the test above simulates them)")
    monkeypatch.setattr(export_mod, "_capture", lambda *a: pytest.fail("captured before checking the folder"))
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    try:
        with pytest.raises(SceneparseError, match=f"cannot write {folder / 'm.pt2'}"):
            export_model(load_model(checkpoint), folder / "m.pt2", format="pt2", size=(40, 40), log=quiet)
    finally:
        folder.chmod(0o755)


def test_an_output_that_is_a_folder_or_below_a_file_is_refused_before_the_capture(checkpoint, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(export_mod, "_capture", lambda *a: pytest.fail("captured before checking the output"))
    model = load_model(checkpoint)
    (tmp_path / "ex").mkdir()
    with pytest.raises(SceneparseError, match=f"--output {tmp_path / 'ex'} is a folder") as err:
        export_model(model, tmp_path / "ex", format="pt2", size=(40, 40), log=quiet)
    assert str(tmp_path / "ex" / "model.pt2") in err.value.hint
    (tmp_path / "photo.png").write_bytes(b"a file")
    with pytest.raises(SceneparseError, match=f"{tmp_path / 'photo.png'} is a file, not a folder"):
        export_model(model, tmp_path / "photo.png" / "sub" / "m.pt2", format="pt2", size=(40, 40), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex", "photo.png"]


@pytest.mark.parametrize("name", ["photo.png", "checkpoint.pt", "fake.pt2"])
def test_read_metadata_of_a_file_that_is_no_export_names_it(checkpoint, tmp_path, name):
    path = tmp_path / name
    if name == "checkpoint.pt":
        path.write_bytes(checkpoint.read_bytes())  # a zip, as .pt2 files are
    else:
        path.write_bytes(b"\x89PNG not onnx" if name.endswith("png") else b"PK\x03\x04 not a real zip")
    if name == "photo.png":
        pytest.importorskip("onnx")
    with pytest.raises(SceneparseError, match=f"{name} is not a model exported by `sceneparse export`"):
        read_metadata(path)


def test_cli_pt2_needs_a_pt2_name(checkpoint, tmp_path, capsys):
    code = main(["export", "--model", str(checkpoint), "--output", str(tmp_path / "m.bin"), "--format", "pt2"])
    assert code == 2
    assert "name the output m.pt2" in capsys.readouterr().err and not (tmp_path / "m.bin").exists()
