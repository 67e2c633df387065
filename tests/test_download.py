"""sceneparse.zoo.download.fetch against a local HTTP server on 127.0.0.1 (never the internet)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sceneparse.errors import SceneparseError
from sceneparse.zoo import download
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


def cached(root, url: str):
    """Where fetch caches `url` when given no filename: url-<first 16 hex of sha256(url)>/<basename>."""
    return root / f"url-{sha(url.encode())[:16]}" / url.rsplit("/", 1)[1]


def manifest(root) -> dict:
    return json.loads((root / "checksums.json").read_text())


def test_plain_download_records_hash(server, tmp_path):
    url = server.url + "/m/weights.pth"
    path = fetch(url, cache_dir=tmp_path, progress=False)
    assert path == cached(tmp_path, url)
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name("weights.pth.part").exists()
    key = path.relative_to(tmp_path).as_posix()
    assert manifest(tmp_path) == {key: {"sha256": sha(PAYLOAD), "size": len(PAYLOAD),
                                        "mtime_ns": path.stat().st_mtime_ns}}
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
    url = server.url + "/m/weights.pth"
    path = fetch(url, progress=False)
    assert path == cached(tmp_path / "envcache", url)


def part_file(root, url: str, data: bytes) -> None:
    """Leave `data` as an unfinished download of `url`."""
    part = cached(root, url).with_suffix(".pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data)


def test_resume_requests_only_the_rest(server, tmp_path):
    done = 4000
    url = server.url + "/m/weights.pth"
    part_file(tmp_path, url, PAYLOAD[:done])
    path = fetch(url, sha256=sha(PAYLOAD), cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.log == [("/m/weights.pth", f"bytes={done}-", len(PAYLOAD) - done)]


def test_server_ignoring_range_restarts(server, tmp_path):
    server.honour_range = False
    # wrong bytes in the .part: appending the full answer to them would corrupt the file
    url = server.url + "/m/weights.pth"
    part_file(tmp_path, url, b"x" * 3000)
    path = fetch(url, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.log == [("/m/weights.pth", "bytes=3000-", len(PAYLOAD))]


def test_part_longer_than_file_restarts(server, tmp_path):
    url = server.url + "/m/weights.pth"
    part_file(tmp_path, url, b"y" * (len(PAYLOAD) + 5))  # server answers 416
    path = fetch(url, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [entry[1] for entry in server.log] == [f"bytes={len(PAYLOAD) + 5}-", None]


def test_interrupted_download_keeps_part_then_resumes(server, tmp_path):
    server.cut_after = 1000
    url = server.url + "/m/weights.pth"
    with pytest.raises(SceneparseError, match="interrupted") as info:
        fetch(url, cache_dir=tmp_path, progress=False)
    assert "run the same command again" in str(info.value)
    assert cached(tmp_path, url).with_suffix(".pth.part").read_bytes() == PAYLOAD[:1000]
    assert not cached(tmp_path, url).exists()

    path = fetch(url, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.log[-1] == ("/m/weights.pth", "bytes=1000-", len(PAYLOAD) - 1000)


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    with pytest.raises(SceneparseError, match="checksum mismatch") as info:
        fetch(url := server.url + "/m/weights.pth", sha256="0" * 64, cache_dir=tmp_path, progress=False)
    assert "deleted" in str(info.value)
    assert not cached(tmp_path, url).exists()
    assert not cached(tmp_path, url).with_suffix(".pth.part").exists()
    assert not (tmp_path / "checksums.json").exists()


def test_manifest_detects_corrupted_cached_file(server, tmp_path, capsys):
    url = server.url + "/m/weights.pth"
    path = fetch(url, cache_dir=tmp_path, progress=False)
    before = path.stat().st_mtime_ns
    path.write_bytes(PAYLOAD[:-1] + b"!")  # same size: only the (new) mtime tells it changed
    os.utime(path, ns=(before + 10**9, before + 10**9))  # don't rely on the filesystem's clock resolution
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
    url = server.url + "/m/weights.pth"
    cached(tmp_path, url).parent.mkdir()
    cached(tmp_path, url).write_bytes(b"put here by hand")
    path = fetch(url, cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == b"put here by hand"
    assert server.log == []
    key = path.relative_to(tmp_path).as_posix()
    assert manifest(tmp_path)[key]["sha256"] == sha(b"put here by hand")
    # the wrong file replaced by hand with the right one: the user's new file, not a corrupted download
    before = path.stat().st_mtime_ns
    path.write_bytes(b"the right file, by hand")
    os.utime(path, ns=(before + 10**9, before + 10**9))
    assert fetch(url, cache_dir=tmp_path, progress=False).read_bytes() == b"the right file, by hand"
    assert server.log == [] and manifest(tmp_path)[key]["sha256"] == sha(b"the right file, by hand")


def test_404(server, tmp_path):
    with pytest.raises(SceneparseError, match="HTTP 404") as info:
        fetch(server.url + "/m/missing.pth", cache_dir=tmp_path, progress=False)
    assert "/m/missing.pth" in str(info.value)
    assert not cached(tmp_path, server.url + "/m/missing.pth").with_suffix(".pth.part").exists()
    assert not cached(tmp_path, server.url + "/m/missing.pth").exists()


def test_offline_message_names_url_and_destination(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/m/weights.pth"
    with pytest.raises(OfflineError) as info:
        fetch(url, cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert url in message
    assert str(cached(tmp_path, url)) in message
    assert isinstance(info.value, SceneparseError)


def test_same_basename_from_two_urls_gives_two_files(server, tmp_path):
    server.files["/a/weights.pth"] = b"weights from a"
    server.files["/b/weights.pth"] = b"weights from b"
    a = fetch(server.url + "/a/weights.pth", cache_dir=tmp_path, progress=False)
    b = fetch(server.url + "/b/weights.pth", cache_dir=tmp_path, progress=False)
    assert a != b
    assert a.read_bytes() == b"weights from a"
    assert b.read_bytes() == b"weights from b"
    # and each is served from its own cache entry afterwards
    assert fetch(server.url + "/a/weights.pth", cache_dir=tmp_path, progress=False) == a
    assert a.read_bytes() == b"weights from a"
    assert len(server.log) == 2


def test_cache_folder_that_cannot_be_created(server, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file")
    root = blocker / "cache"
    with pytest.raises(SceneparseError, match="cannot write to the model cache") as info:
        fetch(server.url + "/m/weights.pth", cache_dir=root, progress=False)
    assert str(root) in str(info.value)
    assert info.value.hint == f"set {download.CACHE_ENV} to a writable folder"
    assert server.log == []  # failed before downloading anything


def test_manifest_that_cannot_be_written(server, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(download.tempfile, "mkstemp", refuse)
    with pytest.raises(SceneparseError, match="cannot write to the model cache") as info:
        fetch(server.url + "/m/weights.pth", cache_dir=tmp_path, progress=False)
    assert str(tmp_path) in str(info.value)
    assert "Permission denied" in str(info.value)


def test_manifest_is_readable_by_everyone(server, tmp_path):
    old = os.umask(0o022)
    try:
        fetch(server.url + "/m/weights.pth", cache_dir=tmp_path, progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "checksums.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".checksums.")] == []  # no temp left


def test_unchanged_cached_file_is_not_hashed_again(server, tmp_path, monkeypatch):
    url = server.url + "/m/weights.pth"
    path = fetch(url, cache_dir=tmp_path, progress=False)
    hashed = []
    real = download.sha256_file
    monkeypatch.setattr(download, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert fetch(url, cache_dir=tmp_path, progress=False) == path
    assert fetch(url, sha256=sha(PAYLOAD), cache_dir=tmp_path, progress=False) == path
    assert hashed == []
    # an expected hash that is not the recorded one is checked against the file itself
    with pytest.raises(SceneparseError, match="checksum mismatch"):
        fetch(url, sha256="0" * 64, cache_dir=tmp_path, progress=False)
    assert hashed[0] == path


def test_cached_file_of_other_size_is_hashed_again(server, tmp_path, capsys):
    url = server.url + "/m/weights.pth"
    path = fetch(url, cache_dir=tmp_path, progress=False)
    stat = path.stat()
    path.write_bytes(PAYLOAD[:-1])  # truncated, with the old mtime put back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fetch(url, cache_dir=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert "corrupted" in capsys.readouterr().err
    assert len(server.log) == 2


def test_manifest_of_hashes_only_is_still_read(server, tmp_path):
    # manifests written before size and mtime were recorded held just the hash
    url = server.url + "/m/weights.pth"
    key = cached(tmp_path, url).relative_to(tmp_path).as_posix()
    cached(tmp_path, url).parent.mkdir()
    cached(tmp_path, url).write_bytes(b"tampered")
    (tmp_path / "checksums.json").write_text(json.dumps({key: sha(PAYLOAD)}))
    assert fetch(url, cache_dir=tmp_path, progress=False).read_bytes() == PAYLOAD
    assert manifest(tmp_path)[key]["sha256"] == sha(PAYLOAD)
    assert manifest(tmp_path)[key]["size"] == len(PAYLOAD)


def test_verified_file_in_read_only_cache_is_served(server, tmp_path, monkeypatch):
    url = server.url + "/m/weights.pth"
    path = fetch(url, cache_dir=tmp_path, progress=False)
    os.utime(path, ns=(1, 1))  # the size/mtime record no longer matches: hashed and found intact

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(download.tempfile, "mkstemp", refuse)  # the manifest cannot be rewritten
    assert fetch(url, cache_dir=tmp_path, progress=False) == path
    assert len(server.log) == 1
