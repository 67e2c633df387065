"""The published-model registry, download_model/resolve and `sceneparse zoo` (local server only)."""
from __future__ import annotations

import json
import socket
import sys
import types

import pytest
from test_download import FileServer

from sceneparse.cli.main import main
from sceneparse.errors import SceneparseError, UnreadableFileError
from sceneparse.zoo import ZOO, cache_state, download_model, fetch, get_entry, missing_model_message, resolve

NAMES = [
    "mobilenetv2dilated-c1_deepsup", "resnet18dilated-ppm_deepsup", "resnet50dilated-ppm_deepsup",
    "resnet101dilated-ppm_deepsup", "resnet50-upernet", "resnet101-upernet", "hrnetv2-c1",
]
EPOCHS = [20, 20, 20, 25, 30, 50, 30]


# --- registry ---------------------------------------------------------------------------------

def test_seven_published_models_with_their_epochs():
    assert list(ZOO) == NAMES
    assert [entry.epoch for entry in ZOO.values()] == EPOCHS
    assert all(entry.num_classes == 150 for entry in ZOO.values())


def test_urls(monkeypatch):
    monkeypatch.delenv("SCENEPARSE_ZOO_URL", raising=False)
    assert ZOO["resnet101-upernet"].urls() == (
        "http://sceneparsing.csail.mit.edu/model/pytorch/ade20k-resnet101-upernet/encoder_epoch_50.pth",
        "http://sceneparsing.csail.mit.edu/model/pytorch/ade20k-resnet101-upernet/decoder_epoch_50.pth",
    )
    monkeypatch.setenv("SCENEPARSE_ZOO_URL", "http://mirror.example/zoo/")
    assert ZOO["hrnetv2-c1"].urls()[1] == "http://mirror.example/zoo/ade20k-hrnetv2-c1/decoder_epoch_30.pth"


def test_published_overall_is_mean_of_miou_and_pixel_accuracy():
    """CSAIL's overall score is (mIoU + pixAcc) / 2, rounded to 2 decimals: holds for every published
    row except MobileNetV2dilated single-scale, whose README row is inconsistent (see registry.py)."""
    inconsistent = []
    for entry in ZOO.values():
        for kind, scores in (("ss", entry.single_scale), ("ms", entry.multi_scale)):
            if abs((scores.mean_iou + scores.pixel_accuracy) / 2 - scores.overall) > 0.0051:
                inconsistent.append((entry.name, kind))
    assert inconsistent == [("mobilenetv2dilated-c1_deepsup", "ss")]


def test_get_entry_accepts_csail_folder_name_and_rejects_unknown():
    assert get_entry("ade20k-resnet50-upernet") is ZOO["resnet50-upernet"]
    with pytest.raises(SceneparseError) as info:
        get_entry("resnet51-upernet")
    assert all(name in str(info.value) for name in NAMES)


# --- download_model / resolve with a stand-in converter ---------------------------------------

@pytest.fixture
def fake_converter(monkeypatch):
    """Replaces sceneparse.zoo.csail (conversion is tested by its owner) and records its calls."""
    calls = []

    def convert_csail_files(encoder, decoder, arch, output):
        calls.append((encoder, decoder, arch, output))
        output.write_bytes(b"converted:" + encoder.read_bytes() + b"|" + decoder.read_bytes())

    monkeypatch.setitem(sys.modules, "sceneparse.zoo.csail",
                        types.SimpleNamespace(convert_csail_files=convert_csail_files))
    return calls


@pytest.fixture
def zoo_server(monkeypatch):
    srv = FileServer()
    entry = ZOO["resnet18dilated-ppm_deepsup"]
    srv.files["/ade20k-resnet18dilated-ppm_deepsup/encoder_epoch_20.pth"] = b"ENC" * 100
    srv.files["/ade20k-resnet18dilated-ppm_deepsup/decoder_epoch_20.pth"] = b"DEC" * 100
    monkeypatch.setenv("SCENEPARSE_ZOO_URL", srv.url)
    yield srv, entry
    srv.close()


def test_download_model_fetches_converts_and_caches(zoo_server, fake_converter, tmp_path):
    srv, entry = zoo_server
    assert cache_state(entry.name, tmp_path) == "missing"
    path = download_model(entry.name, cache_dir=tmp_path, progress=False)

    assert path == tmp_path / "resnet18dilated-ppm_deepsup.pt"
    assert path.read_bytes() == b"converted:" + b"ENC" * 100 + b"|" + b"DEC" * 100
    folder = tmp_path / "ade20k-resnet18dilated-ppm_deepsup"
    assert fake_converter == [(folder / "encoder_epoch_20.pth", folder / "decoder_epoch_20.pth",
                               "resnet18dilated-ppm_deepsup", path)]
    assert sorted(p for p, _, _ in srv.log) == sorted(srv.files)
    assert cache_state(entry.name, tmp_path) == "converted"

    # cached: neither the network nor the converter is used again
    assert download_model(entry.name, cache_dir=tmp_path, progress=False) == path
    assert resolve(entry.name, cache_dir=tmp_path) == path
    assert len(srv.log) == 2 and len(fake_converter) == 1


def test_cached_files_that_do_not_convert_leave_the_cache_and_download_again(zoo_server, tmp_path, monkeypatch):
    """A truncated file whose hash was recorded (no Content-Length to tell) would be trusted by every
    later `zoo download`: a failed conversion removes it and its record, so the next one fetches it."""
    srv, entry = zoo_server
    folder = tmp_path / entry.folder
    folder.mkdir()
    (folder / entry.filenames[0]).write_bytes(b"ENC")  # a cut-short encoder file, hashed as is
    fetch(entry.urls()[0], cache_dir=tmp_path, progress=False, filename=f"{entry.folder}/{entry.filenames[0]}")
    assert f"{entry.folder}/{entry.filenames[0]}" in json.loads((tmp_path / "checksums.json").read_text())

    def convert_csail_files(encoder, decoder, arch, output):
        if encoder.read_bytes() != b"ENC" * 100:
            raise UnreadableFileError(f"cannot read CSAIL encoder {encoder}: truncated")
        output.write_bytes(b"converted")

    monkeypatch.setitem(sys.modules, "sceneparse.zoo.csail",
                        types.SimpleNamespace(convert_csail_files=convert_csail_files))
    (folder / entry.filenames[1]).write_bytes(b"a good decoder")  # placed by hand next to it
    with pytest.raises(SceneparseError, match="truncated(.|\n)*removed from the cache") as info:
        download_model(entry.name, cache_dir=tmp_path, progress=False)
    assert info.value.hint == (f"download it again (sceneparse zoo download {entry.name}), or, offline, put a good "
                               f"copy in {folder}/")
    # only the file that failed goes: the good one (maybe hundreds of MB, copied by hand) stays
    assert [p.name for p in folder.iterdir()] == [entry.filenames[1]]
    (folder / entry.filenames[1]).unlink()  # then gone: fetched from the server, its record no obstacle
    assert f"{entry.folder}/{entry.filenames[0]}" not in json.loads((tmp_path / "checksums.json").read_text())
    assert download_model(entry.name, cache_dir=tmp_path, progress=False).read_bytes() == b"converted"


def test_good_downloads_stay_when_writing_the_converted_model_fails(zoo_server, tmp_path, monkeypatch):
    srv, entry = zoo_server

    def disk_full(encoder, decoder, arch, output):
        raise SceneparseError(f"could not write checkpoint {output}: No space left on device")

    monkeypatch.setitem(sys.modules, "sceneparse.zoo.csail", types.SimpleNamespace(convert_csail_files=disk_full))
    with pytest.raises(SceneparseError, match="No space left on device") as info:
        download_model(entry.name, cache_dir=tmp_path, progress=False)
    assert "removed from the cache" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / entry.folder).iterdir()) == sorted(entry.filenames)


def test_resolve_converts_hand_fetched_files_offline(fake_converter, tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEPARSE_CACHE", str(tmp_path))  # the default cache folder
    folder = tmp_path / "ade20k-hrnetv2-c1"
    folder.mkdir()
    (folder / "encoder_epoch_30.pth").write_bytes(b"e")
    (folder / "decoder_epoch_30.pth").write_bytes(b"d")
    assert cache_state("hrnetv2-c1") == "raw"
    assert resolve("hrnetv2-c1") == tmp_path / "hrnetv2-c1.pt"
    assert (tmp_path / "hrnetv2-c1.pt").read_bytes() == b"converted:e|d"
    assert [call[2] for call in fake_converter] == ["hrnetv2-c1"]


def test_resolve_missing_model_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.delenv("SCENEPARSE_ZOO_URL", raising=False)
    assert resolve("resnet50-upernet", cache_dir=tmp_path, missing_ok=True) is None
    with pytest.raises(SceneparseError) as info:
        resolve("resnet50-upernet", cache_dir=tmp_path)
    message = str(info.value)
    assert message == missing_model_message("resnet50-upernet", cache_dir=tmp_path)
    for url in ZOO["resnet50-upernet"].urls():
        assert url in message
    assert str(tmp_path / "ade20k-resnet50-upernet") in message
    with pytest.raises(SceneparseError, match="published models are"):
        resolve("no-such-model", cache_dir=tmp_path)


def test_load_model_of_uncached_name_says_what_to_fetch(tmp_path, monkeypatch):
    import sceneparse

    monkeypatch.setenv("SCENEPARSE_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no file called like the model here
    with pytest.raises(SceneparseError) as info:
        sceneparse.load_model("resnet101-upernet")
    assert str(info.value) == missing_model_message("resnet101-upernet")


def test_download_model_offline_lists_both_urls(tmp_path, monkeypatch):
    with socket.socket() as sock:  # nobody listens there: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("SCENEPARSE_ZOO_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(SceneparseError) as info:
        download_model("resnet50dilated-ppm_deepsup", cache_dir=tmp_path, progress=False)
    message = str(info.value)
    for url in ZOO["resnet50dilated-ppm_deepsup"].urls():
        assert url in message
    assert str(tmp_path / "ade20k-resnet50dilated-ppm_deepsup") in message


# --- CLI --------------------------------------------------------------------------------------

def test_cli_list_shows_scores_sources_and_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SCENEPARSE_ZOO_URL", raising=False)
    (tmp_path / "resnet101-upernet.pt").write_bytes(b"x")
    assert main(["zoo", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:8]}
    assert list(rows) == NAMES
    # name, encoder, decoder, mIoU, mIoU-ms, pixAcc, pixAcc-ms, overall, overall-ms, cache
    assert rows["resnet101-upernet"] == ["resnet101-upernet", "resnet101", "upernet", "42.00", "42.66",
                                         "80.79", "81.01", "61.40", "61.84", "converted"]
    assert rows["hrnetv2-c1"][-1] == "missing"
    for entry in ZOO.values():
        for url in entry.urls():
            assert url in out


def test_cli_download_prints_checkpoint_path(zoo_server, fake_converter, tmp_path, capsys):
    code = main(["zoo", "download", "resnet18dilated-ppm_deepsup", "--cache-dir", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "resnet18dilated-ppm_deepsup.pt")


def test_cli_download_unknown_name(tmp_path, capsys):
    assert main(["zoo", "download", "resnet9000", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "resnet9000" in err and "resnet50dilated-ppm_deepsup" in err


def test_zoo_package_imports_without_torch():
    """Listing and downloading must not pay for importing torch; conversion is imported on use."""
    import subprocess

    code = "import sys, sceneparse.zoo as z; assert 'torch' not in sys.modules; assert callable(z.resolve)"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- end to end: local server -> download -> real conversion -> load_model ---------------------

def test_download_convert_and_load_by_name(tmp_path, monkeypatch, capsys):
    """A synthetic MobileNetV2dilated-C1_deepsup pair in CSAIL's file layout (keys from
    ../shared/reference) is served locally, downloaded, converted, then loaded by name."""
    import io

    import torch

    csail_reference = pytest.importorskip("csail_reference")
    if not csail_reference.KEYS_DIR.is_dir():
        pytest.skip(f"../shared not found: {csail_reference.KEYS_DIR} (CSAIL key lists)")
    import sceneparse

    name = "mobilenetv2dilated-c1_deepsup"
    enc_shapes, dec_shapes = csail_reference.read_key_lists(name)
    encoder = csail_reference.synthetic_state(enc_shapes, seed=1)
    decoder = csail_reference.synthetic_state(dec_shapes, seed=2)
    srv = FileServer()
    for filename, state in zip(ZOO[name].filenames, (encoder, decoder)):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        srv.files[f"/ade20k-{name}/{filename}"] = buffer.getvalue()
    monkeypatch.setenv("SCENEPARSE_ZOO_URL", srv.url)
    monkeypatch.setenv("SCENEPARSE_CACHE", str(tmp_path))
    try:
        assert main(["zoo", "download", name, "--no-progress"]) == 0
    finally:
        srv.close()
    assert capsys.readouterr().out.strip() == str(tmp_path / f"{name}.pt")

    model = sceneparse.load_model(name)  # no file of that name here: resolved through the zoo
    assert len(model.class_names) == 150 and model.class_names[0].startswith("wall")
    state = model.state_dict()
    assert torch.equal(state["decoder.conv_last.weight"], decoder["conv_last.weight"])
    assert torch.equal(state["decoder.cbr.1.running_var"], decoder["cbr.1.running_var"])
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 35, 50))
    assert logits.shape == (1, 150, 35, 50)


@pytest.mark.parametrize("action, words", [("list", "published ADE20K models"),
                                            ("download", "convert them to a sceneparse checkpoint")])
def test_cli_zoo_actions_describe_themselves_in_help(action, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["zoo", action, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert words in out.split("options:")[0]  # in the description, above the options
