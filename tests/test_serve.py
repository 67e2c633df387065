"""`sceneparse serve`: a real server on 127.0.0.1 (port 0) in a thread; its answers are exactly
`Predictor.predict`'s, and bad requests get JSON errors with the right HTTP status."""
from __future__ import annotations

import contextlib
import io
import json
import select
import socket
import struct
import threading
import time
import zlib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from sceneparse.data.io import read_image
from sceneparse.engine.checkpoint import load_model, save_model
from sceneparse.engine.infer import Predictor
from sceneparse.engine import serve as serve_mod
from sceneparse.engine.serve import make_server
from sceneparse.errors import SceneparseError
from sceneparse.engine.visualize import colorize
from sceneparse.models import build_model

NAMES = ["sky", "road", "car"]
PALETTE = [[0, 0, 255], [128, 64, 128], [255, 0, 0]]
MAX_BODY = 100_000


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(2)
    net = build_model("resnet18", "c1", 3)
    with torch.no_grad():  # without its random bias, this untrained net predicts all 3 classes on `photos`
        net.decoder.conv_last.bias.zero_()
    path = tmp_path_factory.mktemp("ckpt") / "r18.pt"
    save_model(path, net, NAMES, PALETTE)
    return load_model(path)


@contextlib.contextmanager
def running(srv):
    """`srv` serving in a thread, shut down and closed at the end."""
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def server(model):
    with running(make_server(model, "127.0.0.1", 0, quiet=True, max_body_bytes=MAX_BODY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A PNG and a JPEG of a smooth synthetic scene (odd sizes: the Segmenter pads)."""
    folder = tmp_path_factory.mktemp("photos")
    yy, xx = np.mgrid[0:45, 0:70]
    rgb = np.stack([(xx * 3) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], axis=-1).astype(np.uint8)
    rgb[20:30, 10:40] = (250, 30, 30)
    Image.fromarray(rgb).save(folder / "scene.png")
    Image.fromarray(rgb).save(folder / "scene.jpg", quality=90)
    return {"png": folder / "scene.png", "jpg": folder / "scene.jpg"}


def request(server, path: str, body: bytes | None = None, method: str | None = None):
    """(status, content type, body bytes) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(server.url + path, data=body, method=method or ("POST" if body is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def expected_labels(model, path) -> np.ndarray:
    return Predictor(model).predict(read_image(path)).cpu().numpy()


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_label_png_equals_predictor(server, model, photos, kind):
    status, content_type, body = request(server, "/predict", photos[kind].read_bytes())
    assert status == 200 and content_type == "image/png"
    returned = Image.open(io.BytesIO(body))
    assert returned.mode == "L"  # 8-bit class ids
    assert np.array_equal(np.asarray(returned), expected_labels(model, photos[kind]))


def test_json_fractions_are_the_predictions_counts(server, model, photos):
    status, content_type, body = request(server, "/predict?format=json", photos["png"].read_bytes())
    assert status == 200 and content_type == "application/json"
    result = json.loads(body)
    labels = expected_labels(model, photos["png"])
    assert (result["height"], result["width"]) == labels.shape
    counts = np.bincount(labels.ravel(), minlength=len(NAMES))
    assert (counts > 0).sum() >= 2  # a meaningful test: several classes present
    assert {c["id"]: c["pixels"] for c in result["classes"]} == {i: int(n) for i, n in enumerate(counts) if n}
    assert all(c["name"] == NAMES[c["id"]] and c["fraction"] == c["pixels"] / labels.size for c in result["classes"])
    assert sum(c["fraction"] for c in result["classes"]) == pytest.approx(1.0)


def test_color_png_is_the_palette_colours(server, model, photos):
    status, _, body = request(server, "/predict?format=color", photos["png"].read_bytes())
    assert status == 200
    colours = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert np.array_equal(colours, colorize(expected_labels(model, photos["png"]), PALETTE))


def test_concurrent_requests_all_get_the_right_answer(server, model, photos):
    data = photos["png"].read_bytes()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: request(server, "/predict", data), range(4)))
    expected = expected_labels(model, photos["png"])
    assert all(status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), expected)
               for status, _, body in answers)


@pytest.mark.parametrize("body", [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40], ids=["text", "broken-png"])
def test_corrupt_body_is_400_with_a_message(server, body):
    status, content_type, answer = request(server, "/predict", body)
    assert status == 400 and content_type == "application/json"
    assert "cannot decode image" in json.loads(answer)["error"]
    assert request(server, "/health")[0] == 200  # still serving


def test_truncated_png_is_400(server, photos):
    data = photos["png"].read_bytes()
    status, _, answer = request(server, "/predict", data[: len(data) // 2])
    assert status == 400 and json.loads(answer)["error"]


def test_oversized_body_is_413(server):
    status, _, answer = request(server, "/predict", b"\x00" * (MAX_BODY + 1))
    assert status == 413 and str(MAX_BODY) in json.loads(answer)["error"]


def test_unknown_format_is_400(server, photos):
    status, _, answer = request(server, "/predict?format=bmp", photos["png"].read_bytes())
    assert status == 400 and "unknown format" in json.loads(answer)["error"]


def test_health_lists_the_classes(server, model):
    status, _, body = request(server, "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["class_names"] == NAMES and health["device"] == "cpu"
    assert health["model"] == model.config


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_path_is_404(server, method):
    status, _, body = request(server, "/nowhere", b"x" if method == "POST" else None)
    assert status == 404 and "no such path" in json.loads(body)["error"]


def raw(server, data: bytes) -> bytes:
    """All the server sends on one connection until it closes it (a connection left open: timeout)."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        return read_to_close(sock)


def read_to_close(sock) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def png_header(width: int, height: int) -> bytes:
    """The start of an RGB PNG of that size: enough for PIL to read its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))


def test_image_above_pils_bomb_limit_is_413(server):
    # 200 MP: PIL raises DecompressionBombError instead of telling the size
    status, _, answer = request(server, "/predict", png_header(20_000, 10_000))
    assert status == 413 and "too large" in json.loads(answer)["error"]


def test_decoded_size_is_checked_when_the_header_does_not_tell(server, photos, monkeypatch):
    monkeypatch.setattr(serve_mod, "_header_size", lambda body: (0, 0))  # a header PIL cannot size
    monkeypatch.setattr(server.service, "max_pixels", 45 * 70 - 1)
    status, _, answer = request(server, "/predict", photos["png"].read_bytes())
    assert status == 413 and "70x45" in json.loads(answer)["error"]


def test_chunked_upload_is_411_and_closes_the_connection(server):
    # the unread body must not be read as the next request (here one that would be answered)
    answer = raw(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411") and b"Connection: close" in answer
    assert answer.count(b"HTTP/1.1 ") == 1


def test_a_form_upload_is_400_saying_to_send_the_bytes(server, photos):
    body = b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\n" + photos["png"].read_bytes() + b"\r\n--b--\r\n"
    req = urllib.request.Request(server.url + "/predict", data=body, method="POST",
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400 and "--data-binary" in json.loads(err.value.read())["error"]


def test_negative_content_length_is_400(server):
    answer = raw(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"bad Content-Length" in answer


def test_stalled_upload_is_408_not_a_model_failure(server, monkeypatch):
    monkeypatch.setattr(serve_mod.Handler, "timeout", 0.5)  # seconds a client may stall
    answer = raw(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    assert answer.startswith(b"HTTP/1.1 408") and b"prediction failed" not in answer


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD"])
def test_unsupported_method_is_json_405(server, method):
    status, content_type, body = request(server, "/predict", b"x" if method in ("PUT", "PATCH") else None, method)
    assert status == 405 and content_type == "application/json"
    if method != "HEAD":  # (a HEAD answer has no body)
        assert "not allowed" in json.loads(body)["error"]


def test_inference_runs_one_image_at_a_time(server, photos, monkeypatch):
    active, overlaps = [], []

    class SlowPredictor:  # records calls that overlap
        def predict(self, image):
            active.append(1)
            overlaps.append(len(active) > 1)
            time.sleep(0.1)
            active.pop()
            return torch.zeros(image.shape[-2:], dtype=torch.int64)

    monkeypatch.setattr(server.service, "predictor", SlowPredictor())
    data = photos["png"].read_bytes()
    with ThreadPoolExecutor(4) as pool:
        statuses = [status for status, _, _ in pool.map(lambda _: request(server, "/predict", data), range(4))]
    assert statuses == [200] * 4 and len(overlaps) == 4 and not any(overlaps)


def slot_taken(slots) -> bool:
    """Whether no slot is free (a free one is taken and given back at once)."""
    if not slots.acquire(blocking=False):
        return True
    slots.release()
    return False


def test_a_request_beyond_max_concurrent_gets_503_while_health_answers(model, photos):
    """With one slot, an upload stalled mid-body holds it: the next POST waits `slot_wait`, then
    gets a JSON 503 with Retry-After and a closed connection; /health never waits; the slot comes
    back when the upload finishes, and when its client goes away."""
    data = photos["png"].read_bytes()
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n".encode()
    with running(make_server(model, "127.0.0.1", 0, quiet=True, max_concurrent=1)) as srv:
        assert srv.service.max_concurrent == 1 and json.loads(request(srv, "/health")[2])["max_concurrent"] == 1
        for ending in ("finish", "disconnect"):
            srv.service.slot_wait = 0.3  # seconds (5 by default)
            with socket.create_connection(srv.server_address[:2], timeout=10) as upload:
                upload.sendall(head + b"Connection: close\r\n\r\n" + data[:100])  # mid-body: it holds the slot
                deadline = time.monotonic() + 5
                while not slot_taken(srv.service.slots):
                    assert time.monotonic() < deadline, "the upload never took its slot"
                    time.sleep(0.01)
                headers, _, body = raw(srv, head + b"\r\n" + data).partition(b"\r\n\r\n")  # the server must close
                status_line, *lines = headers.decode().split("\r\n")
                fields = dict(line.split(": ", 1) for line in lines)
                assert status_line.startswith("HTTP/1.1 503") and fields["Retry-After"] == "1"
                assert fields["Content-Type"] == "application/json" and fields["Connection"] == "close"
                assert json.loads(body)["status"] == 503 and "busy" in json.loads(body)["error"]
                assert request(srv, "/health")[0] == 200  # no slot needed
                if ending == "finish":
                    upload.sendall(data[100:])
                    assert read_to_close(upload).startswith(b"HTTP/1.1 200")
            srv.service.slot_wait = 10  # the next request gets the slot as soon as it is released
            status, _, labels = request(srv, "/predict", data)
            assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(labels))),
                                                     expected_labels(model, photos["png"]))


def test_a_busy_server_refuses_before_100_continue_and_a_trickling_upload_loses_its_slot(model, photos, monkeypatch):
    """With `Expect: 100-continue` the 503 comes instead of "100 Continue" (the client never sends
    its body); an upload slower than the deadline allows gets a 408 and frees its slot."""
    data = photos["png"].read_bytes()
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n".encode()
    monkeypatch.setattr(serve_mod, "UPLOAD_GRACE_S", 1.0)
    monkeypatch.setattr(serve_mod, "MIN_UPLOAD_RATE", 10**9)  # the whole body within about 1 s
    with running(make_server(model, "127.0.0.1", 0, quiet=True, max_concurrent=1)) as srv:
        srv.service.slot_wait = 0.3
        with socket.create_connection(srv.server_address[:2], timeout=10) as upload:
            upload.sendall(head + b"\r\n" + data[:100])
            deadline = time.monotonic() + 5
            while not slot_taken(srv.service.slots):
                assert time.monotonic() < deadline, "the upload never took its slot"
                time.sleep(0.01)
            answer = raw(srv, head + b"Expect: 100-continue\r\n\r\n")  # headers only: it waits for the 100
            assert answer.startswith(b"HTTP/1.1 503") and b"100 Continue" not in answer
            for i in range(100, 200):  # a byte every 0.05 s, never stalled but too slow, until the answer
                if select.select([upload], [], [], 0.05)[0]:
                    break
                upload.sendall(data[i:i + 1])
            answer = read_to_close(upload)
            assert answer.startswith(b"HTTP/1.1 408") and b"took longer than" in answer
        srv.service.slot_wait = 10
        status, _, _ = request(srv, "/predict", data)
        assert status == 200  # the slot came back
        # with a free slot, "100 Continue" comes first and the upload goes through
        with socket.create_connection(srv.server_address[:2], timeout=10) as sock:
            sock.sendall(head + b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
            assert sock.recv(25).startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(data)
            assert b"HTTP/1.1 200" in read_to_close(sock)
        assert not slot_taken(srv.service.slots)


def test_a_client_gone_before_its_answer_leaves_no_traceback(model, photos, monkeypatch, capfd):
    class SlowPredictor:  # long enough for the client to reset the connection first
        def predict(self, image):
            time.sleep(0.5)
            return torch.zeros(image.shape[-2:], dtype=torch.int64)

    data = photos["png"].read_bytes()
    with running(make_server(model, "127.0.0.1", 0, quiet=True)) as srv:
        real = srv.service.predictor
        srv.service.predictor = SlowPredictor()
        sock = socket.create_connection(srv.server_address[:2], timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(0.1)
        sock.close()
        time.sleep(1.0)  # the answer meets the reset connection
        srv.service.predictor = real
        assert request(srv, "/predict", data)[0] == 200  # still serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err


def test_bind_errors_blame_the_port_or_the_host(server, model):
    with pytest.raises(SceneparseError) as err:  # the port is taken by `server`
        make_server(model, "127.0.0.1", server.server_address[1], quiet=True)
    assert "--port" in err.value.hint
    with pytest.raises(SceneparseError) as err:  # TEST-NET-1: not an address of this machine
        make_server(model, "192.0.2.1", 0, quiet=True)
    assert "--host" in err.value.hint and "--port" not in err.value.hint


def test_ipv6_host_binds(model):
    try:
        srv = make_server(model, "::1", 0, quiet=True)
    except SceneparseError as err:
        pytest.skip(f"no IPv6 loopback here: {err.message}")
    srv.server_close()
    assert srv.url.startswith("http://[::1]:")


def test_the_serve_command_passes_its_options_to_the_server(model, tmp_path, monkeypatch, capsys):
    """`sceneparse serve` (the CLI, up to serving): the flags reach the Predictor and the server,
    and bad ones are one message before any model is loaded."""
    from sceneparse.cli.main import build_parser, main

    path = tmp_path / "m.pt"
    save_model(path, model, NAMES, PALETTE)
    served = []
    monkeypatch.setattr(serve_mod, "serve", lambda srv: (served.append(srv), srv.server_close()))
    assert main(["serve", "--model", str(path), "--port", "0", "--scales", "40", "60", "--flip",
                 "--max-body-mb", "0.5", "--max-concurrent", "2", "--device", "cpu", "--quiet"]) == 0
    (srv,) = served
    predictor = srv.service.predictor
    assert predictor.scales == (40, 60) and predictor.flip and srv.service.max_body_bytes == 512 * 1024
    assert srv.service.class_names == NAMES and srv.quiet and srv.service.max_concurrent == 2
    # --protocol csail: CSAIL's own resizing (Pillow, sizes rounded up to the model's multiple)
    assert main(["serve", "--model", str(path), "--port", "0", "--protocol", "csail", "--single-scale",
                 "--device", "cpu", "--quiet"]) == 0
    csail = served[-1].service.predictor
    assert csail.scales == (450,) and csail.resize == "pil" and csail.max_size == 1000
    # the CLI spells its default out (`--help` imports no torch): it must be the server's
    assert build_parser().parse_args(["serve", "--model", "m"]).max_concurrent == serve_mod.DEFAULT_MAX_CONCURRENT
    for bad, message in ((["--port", "70000"], "--port must be between 0 and 65535"),
                         (["--window", "8"], "--window must be at least 32 pixels"),
                         (["--max-body-mb", "0"], "--max-body-mb must be positive"),
                         (["--max-concurrent", "0"], "--max-concurrent must be positive"),
                         (["--protocol", "csail", "--scales", "450"], "--scales cannot be combined"),
                         (["--single-scale"], "--single-scale belongs to --protocol csail")):
        assert main(["serve", "--model", str(tmp_path / "absent.pt"), *bad]) == 2
        assert message in capsys.readouterr().err


def test_sigterm_stops_the_server_cleanly(tmp_path):
    # docker stop and systemd send SIGTERM: the server says it stops and exits 0, as on Ctrl-C
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "m.pt"
    save_model(path, build_model("timm:test_resnet", "c1", 3), NAMES, PALETTE)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "sceneparse", "serve", "--model", str(path), "--port", "0",
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stderr.readline()
        assert first.startswith("serving 3 classes on http://127.0.0.1:"), first
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0 and rest.strip().endswith("stopping") and "Traceback" not in rest
