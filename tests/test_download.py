"""sceneparse.zoo.download.fetch against a local HTTP server on 127.0.0.1 (never the internet)."""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sceneparse.errors import SceneparseError
from sceneparse.zoo.download import OfflineError, fetch

PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes, every offset distinguishable


class FileServer:
    """Serves `files` (path -> bytes); logs (path, Range header, bytes sent) of every GET."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.cut_after: int | None = None  # send only this many body bytes once, then drop the connection
        self.log: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = server.files.get(self.path)
                if body is None:
                    # log before answering: the client may check the log as soon as it has the answer
                    server.log.append((self.path, self.headers.get("Range"), 0))
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and server.honour_range:
                    start = int(match.group(1))
                    if start >= len(body):
                        server.log.append((self.path, self.headers.get("Range"), 0))
                        self.send_error(416)
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                sent = body[start:]
                if server.cut_after is not None:
                    sent, server.cut_after = sent[: server.cut_after], None
                    self.close_connection = True
                server.log.append((self.path, self.headers.get("Range"), len(sent)))
                self.wfile.write(sent)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FileServer()
    srv.files["/m/weights.pth"] = PAYLOAD
    yield srv
    srv.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_plain_download_records_hash(server, tmp_path):
    path = fetch(server.url + "/m/weights.pth", cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "weights.pth"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "weights.pth.part").exists()
    assert json.loads((tmp_path / "checksums.json").read_text()) == {"weights.pth": sha(PAYLOAD)}
    assert server.log == [("/m/weights.pth", None, len(PAYLOAD))]
    # second call: served from the cache, no request
    assert fetch(server.url + "/m/weights.pth", cache_dir=tmp_path, progress=False) == path
    assert len(server.log) == 1


def test_filename_with_subfolder_and_expected_hash(server, tmp_path):
    path = fetch(server.url + "/m/weights.pth", sha256=sha(PAYLOAD), cache_dir=tmp_path,
                 progress=False, filename="ade20k-x/encoder.pth")
    assert path == tmp_path / "ade20k-x" / "encoder.pth"
    assert path.read_bytes() == PAYLOAD


def test_cache_dir_from_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEPARSE_CACHE", str(tmp_path / "envcache"))
    path = fetch(server.url + "/m/weights.pth", progress=False)
    assert path == tmp_path / "envcache" / "weights.pth"


def test_resume_requests_only_the_rest(server, tmp_path):
    done = 4000
    (tmp_path / "weights.pth.part").write_bytes(PAYLOAD[:done])
    path = fetch(server.url + "/m/weights.pth", sha256=sha(PAYLOAD), cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.log == [("/m/weights.pth", f"bytes={done}-", len(PAYLOAD) - done)]


def test_server_ignoring_range_restarts(server, tmp_path):
    server.honour_range = False
    # wrong bytes in the .part: appending the full answer to them would corrupt the file
    (tmp_path / "weights.pth.part").write_bytes(b"x" * 3000)
    path = fetch(server.url + "/m/weights.pth", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.log == [("/m/weights.pth", "bytes=3000-", len(PAYLOAD))]


def test_part_longer_than_file_restarts(server, tmp_path):
    (tmp_path / "weights.pth.part").write_bytes(b"y" * (len(PAYLOAD) + 5))  # server answers 416
    path = fetch(server.url + "/m/weights.pth", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [entry[1] for entry in server.log] == [f"bytes={len(PAYLOAD) + 5}-", None]


def test_interrupted_download_keeps_part_then_resumes(server, tmp_path):
    server.cut_after = 1000
    url = server.url + "/m/weights.pth"
    with pytest.raises(SceneparseError, match="interrupted") as info:
        fetch(url, cache_dir=tmp_path, progress=False)
    assert "run the same command again" in str(info.value)
    assert (tmp_path / "weights.pth.part").read_bytes() == PAYLOAD[:1000]
    assert not (tmp_path / "weights.pth").exists()

    path = fetch(url, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.log[-1] == ("/m/weights.pth", "bytes=1000-", len(PAYLOAD) - 1000)


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    with pytest.raises(SceneparseError, match="checksum mismatch") as info:
        fetch(server.url + "/m/weights.pth", sha256="0" * 64, cache_dir=tmp_path, progress=False)
    assert "deleted" in str(info.value)
    assert not (tmp_path / "weights.pth").exists()
    assert not (tmp_path / "weights.pth.part").exists()
    assert not (tmp_path / "checksums.json").exists()


def test_manifest_detects_corrupted_cached_file(server, tmp_path, capsys):
    url = server.url + "/m/weights.pth"
    path = fetch(url, cache_dir=tmp_path, progress=False)
    path.write_bytes(PAYLOAD[:-1] + b"!")  # bit rot
    assert fetch(url, cache_dir=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert "corrupted" in capsys.readouterr().err
    assert len(server.log) == 2  # fetched again


def test_manifest_detects_changed_server_file(server, tmp_path):
    url = server.url + "/m/weights.pth"
    path = fetch(url, cache_dir=tmp_path, progress=False)
    path.unlink()
    server.files["/m/weights.pth"] = b"something else"
    with pytest.raises(SceneparseError, match="checksum mismatch") as info:
        fetch(url, cache_dir=tmp_path, progress=False)
    assert "checksums.json" in str(info.value)  # the hint says which record to delete
    assert not path.exists()


def test_hand_placed_file_is_recorded(server, tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"put here by hand")
    path = fetch(server.url + "/m/weights.pth", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == b"put here by hand"
    assert server.log == []
    assert json.loads((tmp_path / "checksums.json").read_text())["weights.pth"] == sha(b"put here by hand")


def test_404(server, tmp_path):
    with pytest.raises(SceneparseError, match="HTTP 404") as info:
        fetch(server.url + "/m/missing.pth", cache_dir=tmp_path, progress=False)
    assert "/m/missing.pth" in str(info.value)
    assert not (tmp_path / "missing.pth.part").exists()
    assert not (tmp_path / "missing.pth").exists()


def test_offline_message_names_url_and_destination(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/m/weights.pth"
    with pytest.raises(OfflineError) as info:
        fetch(url, cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert url in message
    assert str(tmp_path / "weights.pth") in message
    assert isinstance(info.value, SceneparseError)
