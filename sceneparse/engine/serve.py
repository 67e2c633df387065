"""A small HTTP server around one model: `GET /health`, `POST /predict` (see docs/deploy.md).

Standard library only (`http.server.ThreadingHTTPServer`): one model, one Predictor, and a lock
around inference, so requests are read and answered in parallel but the network runs one image at
a time (a second concurrent forward pass would only compete for the same cores or GPU, and double
the peak memory). At most `max_concurrent` requests hold a body or an image at once (a slot each,
from reading the body to sending the answer): without the bound, every simultaneous upload would
keep its body and decoded image in memory while it waits for the lock. Decoding is sceneparse's
own (`decode_image_bytes`: EXIF orientation, any format `sceneparse predict` reads), colours are
`visualize.colorize`.

Errors are JSON `{"error": message, "status": code}`: 400 for a body that is not an image, a bad
query or a bad Content-Length, 404 for an unknown path, 405 for a wrong method, 408 for an upload
that stalls or is too slow (UPLOAD_GRACE_S, MIN_UPLOAD_RATE), 411 without Content-Length (chunked
uploads included), 413 for a body above `max_body_bytes` or an image above `max_pixels`, 500 for a
failure inside the model, 503 (with Retry-After) when no slot frees within `slot_wait` seconds
(checked before "100 Continue" when the client asks for it). A refused request whose body was not
read closes the connection (its bytes must not be parsed as the next request). `GET /health`
needs no slot.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import re
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch

from sceneparse.errors import SceneparseError

FORMATS = ("png", "json", "color")
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000  # ~ 8000 x 6000; a decoded image costs 3 bytes a pixel, more in the model
DRAIN_LIMIT = 8 * 1024 * 1024  # unread body bytes we still read (and drop) after refusing a request
# Requests holding a body or an image at once: a few, so that the next uploads are read and decoded
# while the model runs; more would only be more images waiting for the lock.
DEFAULT_MAX_CONCURRENT = 4
SLOT_WAIT = 5.0  # seconds a request waits for a slot before its 503: short, as it holds a thread and a connection
# An upload holding a slot must finish within UPLOAD_GRACE_S + its size / MIN_UPLOAD_RATE seconds
# (20 MB: 330 s), else 408: a client trickling bytes would otherwise keep its slot for ever.
UPLOAD_GRACE_S = 10.0
MIN_UPLOAD_RATE = 64 * 1024  # bytes a second


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class SegmentationService:
    """What the handler calls: the model, its Predictor, the lock that serialises inference and the
    slots that bound the requests in progress."""

    def __init__(self, model, predictor, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_concurrent: int = DEFAULT_MAX_CONCURRENT):
        from sceneparse.data.meta import make_palette

        self.model = model
        self.predictor = predictor
        self.num_classes = int(model.num_classes)
        self.class_names = list(getattr(model, "class_names", None) or [f"class_{i}" for i in range(self.num_classes)])
        self.palette = getattr(model, "palette", None) or make_palette(self.num_classes)
        self.max_body_bytes = int(max_body_bytes)
        self.max_pixels = int(max_pixels)
        self.lock = threading.Lock()
        self.max_concurrent = int(max_concurrent)
        self.slots = threading.BoundedSemaphore(self.max_concurrent)
        self.slot_wait = SLOT_WAIT

    def health(self) -> dict:
        p = self.predictor
        return {"status": "ok", "model": dict(getattr(self.model, "config", None) or {}),
                "num_classes": self.num_classes, "class_names": self.class_names, "palette": self.palette,
                "device": str(p.device), "scales": list(p.scales), "flip": p.flip,
                "max_body_bytes": self.max_body_bytes, "max_concurrent": self.max_concurrent,
                "formats": list(FORMATS)}

    def segment(self, body: bytes) -> torch.Tensor:
        """Class ids `H x W` (int64, CPU) of an encoded image."""
        from sceneparse.data.io import decode_image_bytes

        self._check_pixels(*_header_size(body))  # before decoding: refuse a huge image cheaply
        try:
            image = decode_image_bytes(body, "request body")
        except SceneparseError as err:  # PIL names its buffer object: not useful to a client
            raise RequestError(HTTPStatus.BAD_REQUEST, re.sub(r" <_io\.BytesIO object at \w+>", "", err.message)) from None
        self._check_pixels(*image.shape[-2:])  # the header may not have told (a format PIL cannot size)
        with self.lock:
            return self.predictor.predict(image).cpu()

    def _check_pixels(self, h: int, w: int) -> None:
        if h * w > self.max_pixels:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"image of {w}x{h} pixels is above this server's limit of {self.max_pixels} pixels")

    def respond(self, labels: torch.Tensor, fmt: str) -> tuple[bytes, str]:
        """(body, content type) of a prediction in format `fmt`."""
        from sceneparse.engine.visualize import colorize

        if fmt == "png":
            dtype = np.uint8 if self.num_classes <= 255 else np.uint16  # as `sceneparse predict`
            return _png(labels.numpy().astype(dtype)), "image/png"
        if fmt == "color":
            return _png(colorize(labels, self.palette)), "image/png"
        counts = torch.bincount(labels.reshape(-1), minlength=self.num_classes)
        total = labels.numel()
        classes = [{"id": i, "name": self.class_names[i], "pixels": int(counts[i]), "fraction": int(counts[i]) / total}
                   for i in counts.argsort(descending=True, stable=True).tolist() if counts[i] > 0]
        result = {"height": int(labels.shape[0]), "width": int(labels.shape[1]), "classes": classes}
        return json.dumps(result).encode(), "application/json"


def _header_size(body: bytes) -> tuple[int, int]:
    """(H, W) from the image header, before decoding (cheap); (0, 0) if PIL cannot tell (the decoder
    then gives the error). PIL's own decompression-bomb refusal (above ~179 MP, or its warning
    above ~89 MP when warnings are errors) is a 413 too, not a header it cannot read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(body)) as img:
            w, h = img.size
        return h, w
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image too large: {err}") from None
    except Exception:  # noqa: BLE001 - not an image PIL knows: decode_image_bytes reports it
        return 0, 0


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    """One request; `self.server.service` is the SegmentationService."""

    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` (curl's for bodies > 1 MB)
    server_version = "sceneparse"
    timeout = 60  # seconds a client may stall mid-request before its connection is dropped
    slot_held = False  # whether this connection's current request holds a slot

    # ------------------------------------------------------------------ helpers
    def _send(self, status: HTTPStatus, body: bytes, content_type: str, close: bool = False,
              headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:  # the client left before its answer: nothing to tell it, no traceback
            self.close_connection = True
            self.log_message("client went away before the answer (%s)", int(status))

    def _error(self, status: HTTPStatus, message: str, close: bool = False, headers: dict | None = None) -> None:
        self._send(status, json.dumps({"error": message, "status": int(status)}).encode(), "application/json",
                   close, headers)

    def _json(self, obj: dict) -> None:
        self._send(HTTPStatus.OK, json.dumps(obj).encode(), "application/json")

    def _length(self) -> int:
        value = self.headers.get("Content-Length")
        if "Transfer-Encoding" in self.headers:  # (a Content-Length beside it would not be the length)
            raise RequestError(HTTPStatus.LENGTH_REQUIRED,
                               "chunked uploads are not supported: send the image with a Content-Length")
        if value is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the image as the request body with a Content-Length")
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:  # (a negative one would make rfile.read wait for the client to close)
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {value!r}")
        if length > self.server.service.max_body_bytes:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"body of {length} bytes is above this server's limit of "
                               f"{self.server.service.max_body_bytes} bytes")
        return length

    def _drain(self, length: int) -> None:
        """Read and drop an unread body (up to DRAIN_LIMIT), so that closing the socket does not
        reset the connection before the client has read our error."""
        left = min(length, DRAIN_LIMIT)
        with contextlib.suppress(ConnectionError, TimeoutError):  # a client gone or stalled: nothing to drain
            while left > 0:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)

    def _take_slot(self) -> None:
        """A slot for this request (held until do_POST ends), or a 503 after `slot_wait` seconds."""
        service = self.server.service
        if not service.slots.acquire(timeout=service.slot_wait):
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE,
                               f"busy: {service.max_concurrent} requests in progress, none finished within "
                               f"{service.slot_wait:g} seconds; retry later",
                               {"Retry-After": str(max(1, math.ceil(service.slot_wait)))})
        self.slot_held = True

    def _read_body(self, length: int) -> bytes:
        """The body, read as it arrives, within the upload deadline (UPLOAD_GRACE_S, MIN_UPLOAD_RATE)."""
        allowed = UPLOAD_GRACE_S + length / MIN_UPLOAD_RATE
        deadline, chunks, got = time.monotonic() + allowed, [], 0
        too_slow = RequestError(HTTPStatus.REQUEST_TIMEOUT,
                                f"the upload took longer than {allowed:.0f} seconds for {length} bytes "
                                f"(this server needs {MIN_UPLOAD_RATE // 1024} KiB/s)")
        try:
            while got < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise too_slow
                self.connection.settimeout(min(self.timeout, left))
                try:
                    chunk = self.rfile.read1(min(length - got, 1 << 20))  # what has arrived, at most one recv
                except TimeoutError:  # no data for `timeout` seconds, or none before the deadline
                    if left < self.timeout:
                        raise too_slow from None
                    raise RequestError(HTTPStatus.REQUEST_TIMEOUT,
                                       f"the body stalled: no data for {self.timeout:g} seconds") from None
                if not chunk:
                    break  # the client closed: the caller sees a short body
                chunks.append(chunk)
                got += len(chunk)
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(chunks)

    # ------------------------------------------------------------------ http.server hooks
    def handle_expect_100(self) -> bool:
        # Refuse an oversized upload, or one that would find no slot, before the client sends it.
        self.slot_held = False
        try:
            self._length()
            if self.command == "POST" and urlsplit(self.path).path == "/predict":
                self._take_slot()
            return super().handle_expect_100()
        except RequestError as err:
            self._error(err.status, err.message, close=True, headers=err.headers)
            return False
        except BaseException:  # the client left before "100 Continue": the slot goes back
            self._release_slot()
            raise

    def _release_slot(self) -> None:
        if self.slot_held:
            self.slot_held = False
            self.server.service.slots.release()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path
        if path == "/health":
            self._json(self.server.service.health())
        elif path == "/predict":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "POST the image bytes to /predict")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path {path!r}; try GET /health or POST /predict")

    def do_POST(self) -> None:  # noqa: N802
        service = self.server.service
        url = urlsplit(self.path)
        unread = _declared_length(self.headers)  # body bytes still in the socket, as far as we can drain them
        body_read = False
        try:
            if url.path != "/predict":
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such path {url.path!r}; try POST /predict")
            fmt = parse_qs(url.query).get("format", ["png"])[-1]
            if fmt not in FORMATS:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
            if self.headers.get_content_type() == "multipart/form-data":  # curl -F: the commonest client slip
                raise RequestError(HTTPStatus.BAD_REQUEST, "send the image file's bytes as the body "
                                   "(curl --data-binary @photo.jpg), not a form upload (curl -F)")
            length = self._length()
            # A slot before the body is read (taken already if the client asked for "100 Continue"):
            # it bounds the bodies and images in memory at once.
            if not self.slot_held:
                self._take_slot()
            unread = 0  # a body stalled or too slow is not drained: that would only wait for it again
            body = self._read_body(length)
            if len(body) < length:
                raise RequestError(HTTPStatus.BAD_REQUEST, "the body ended before its Content-Length")
            body_read = True
            labels = service.segment(body)
            payload, content_type = service.respond(labels, fmt)
        except RequestError as err:
            # A body not read whole (refused early, chunked, stalled, busy) would be parsed as the
            # next request on this connection: close it.
            self._error(err.status, err.message, close=not body_read, headers=err.headers)
            self._drain(unread)
        except Exception as err:  # noqa: BLE001 - a bug or out of memory: answer, log, keep serving
            self.log_error("prediction failed: %s: %s", type(err).__name__, err)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"prediction failed: {type(err).__name__}: {err}",
                        close=not body_read)
        else:
            self._send(HTTPStatus.OK, payload, content_type)
        finally:  # whatever happened, even a client gone mid-answer: a lost slot would be lost for good
            self._release_slot()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals as JSON too: a bad request line, and (its 501) a method
        without a `do_` handler, which for this server is a 405."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} not allowed; use GET or POST"
        self._error(HTTPStatus(code), message or HTTPStatus(code).phrase, close=True)  # any body is unread

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        if not self.server.quiet:  # the access log; errors are always logged (log_error)
            super().log_message(format, *args)

    def log_error(self, format: str, *args) -> None:  # noqa: A002
        super().log_message(format, *args)


def _declared_length(headers) -> int:
    if "Transfer-Encoding" in headers:  # chunked: not a length we can drain
        return 0
    try:
        return max(0, int(headers.get("Content-Length", 0)))
    except ValueError:
        return 0


class SegmentationServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the service; handler threads die with the process (daemon)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: SegmentationService, quiet: bool = False):
        self.service = service
        self.quiet = quiet
        if ":" in address[0]:  # an IPv6 address such as :: or ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(model, host: str = "127.0.0.1", port: int = 8080, *, scales=(None,), flip: bool = False,
                max_size: int = 1000, window: int | None = 1024, device=None,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_concurrent: int = DEFAULT_MAX_CONCURRENT, quiet: bool = False,
                predictor=None) -> SegmentationServer:
    """A server for `model` bound to host:port (port 0: any free port, see `server.url`), not yet
    serving. `predictor`: a ready Predictor of `model` (CSAIL's protocol, say) instead of one made
    from scales, flip, max_size, window and device."""
    from sceneparse.engine.infer import Predictor

    if predictor is None:
        predictor = Predictor(model, scales=scales, flip=flip, max_size=max_size, device=device, window=window)
    service = SegmentationService(model, predictor, max_body_bytes=max_body_bytes, max_pixels=max_pixels,
                                  max_concurrent=max_concurrent)
    try:
        return SegmentationServer((host, port), service, quiet=quiet)
    except OSError as err:
        hint = ("choose another --port (or --port 0 for any free one)" if err.errno == errno.EADDRINUSE else
                "use an address of this machine as --host: 127.0.0.1 (this machine only), or 0.0.0.0 / :: "
                "(every IPv4 / IPv6 interface)")
        raise SceneparseError(f"cannot listen on {host}:{port}: {err.strerror or err}", hint) from None


def serve(server: SegmentationServer, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> None:
    """Serve until Ctrl-C or SIGTERM (`docker stop`, systemd), or `server.shutdown()` from another
    thread, then close the socket."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM stops as Ctrl-C does (a clean exit, status 0); signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, interrupt) if threading.current_thread() is threading.main_thread() else None
    try:  # the announcement inside: a SIGTERM right after it (a supervisor that saw it) stops cleanly too
        log(f"serving {server.service.num_classes} classes on {server.url} "
            f"(GET /health, POST /predict?format=png|json|color); Ctrl-C stops")
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopping")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        server.server_close()
