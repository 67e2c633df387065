"""Download + cache for the published models.

Cache layout (root: `SCENEPARSE_CACHE`, else `~/.cache/sceneparse`)::

    <root>/checksums.json                            SHA-256 (+ size, mtime) of every file fetched
    <root>/ade20k-<name>/{encoder,decoder}_epoch_N.pth   CSAIL's raw files, as on their server
    <root>/<name>.pt                                 our converted one-file checkpoint
    <root>/url-<sha256(url)[:16]>/<basename>         any other URL (e.g. backbone weights)

Hashes are trusted on first use. A cached file whose size and mtime still match its manifest entry is
not hashed again (weights are hundreds of MB); any change to either makes `fetch` re-hash and verify it.

Downloads stream into `<file>.part` and are renamed into place only once complete and verified, so an
interrupted download never leaves a file that looks finished; the next run resumes the `.part` with an
HTTP Range request.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from sceneparse.errors import SceneparseError, UnreadableFileError
from sceneparse.zoo.registry import ZooEntry, get_entry

CACHE_ENV = "SCENEPARSE_CACHE"
MANIFEST = "checksums.json"
TIMEOUT_S = 30
CHUNK = 1 << 20


class OfflineError(SceneparseError):
    """The server could not be reached at all (no network, DNS failure, connection refused)."""


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sceneparse"


def _root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _writing_to(root: Path):
    """Turn an OSError from writing into the cache into one message that says what to do."""
    try:
        yield
    except OSError as err:
        raise SceneparseError(f"cannot write to the model cache {root}: {err}",
                              hint=f"set {CACHE_ENV} to a writable folder") from err


def _read_manifest(root: Path) -> dict[str, dict]:
    """key -> {"sha256", "size", "mtime_ns"}; older manifests held only the hash (a plain string)."""
    path = root / MANIFEST
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SceneparseError(f"{path} is not valid JSON ({err})",
                              hint="delete it; hashes are recorded again on the next download") from err
    return {key: {"sha256": value} if isinstance(value, str) else value for key, value in raw.items()}


def _unchanged(entry: dict | None, path: Path) -> bool:
    """Whether `path` still has the size and mtime recorded with its hash (then it need not be re-hashed)."""
    if entry is None or "size" not in entry or "mtime_ns" not in entry:
        return False
    stat = path.stat()
    return stat.st_size == entry["size"] and stat.st_mtime_ns == entry["mtime_ns"]


def _record_hash(root: Path, key: str, digest: str, path: Path, by_hand: bool = False) -> None:
    stat = path.stat()
    manifest = _read_manifest(root)
    manifest[key] = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if by_hand:  # the user's file, not a download: replacing it later is the user's right
        manifest[key]["by_hand"] = True
    _write_manifest(root, manifest)


def _write_manifest(root: Path, manifest: dict) -> None:
    with _writing_to(root):
        # atomic replace so a crash never leaves half a manifest
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".checksums.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600: keep a shared cache readable by everyone
            os.replace(tmp, root / MANIFEST)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def cache_key(url: str) -> str:
    """Where `fetch` caches `url` when given no filename, relative to the cache root: keyed by the
    whole URL, so two URLs that end in the same file name never share a cached file."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    return f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}/{name}"


def fetch(url: str, sha256: str | None = None, cache_dir: str | os.PathLike | None = None,
          progress: bool = True, filename: str | None = None) -> Path:
    """Download `url` into the cache (as `filename`, a path relative to the cache root; default:
    `cache_key(url)`) and return the file's path. Reuses a verified cached copy.

    The file is checked against `sha256` if given, else against the hash recorded in the cache's
    manifest when the file was first downloaded (a cached file that no longer matches is fetched again).
    """
    root = _root(cache_dir)
    key = filename or cache_key(url)
    dest = root / key
    entry = _read_manifest(root).get(key)
    recorded = entry["sha256"] if entry else None
    # a hand-placed file's record says what the user put there, not what the server sends
    expected = sha256 or (None if entry and entry.get("by_hand") and not dest.exists() else recorded)

    if dest.exists():
        if expected == recorded and _unchanged(entry, dest):
            return dest  # hashed before and untouched since
        actual = sha256_file(dest)
        if expected is None or (sha256 is None and entry and entry.get("by_hand")):
            # a file the user put there by hand (or replaced by hand, a wrong one by the right one,
            # say): recorded as it is now, never deleted as "corrupted"
            _record_hash(root, key, actual, dest, by_hand=True)
            return dest
        if actual == expected:
            # record size and mtime so the next fetch need not hash it; a read-only (shared) cache
            # still works without that, it is only hashed every time
            with contextlib.suppress(SceneparseError):
                _record_hash(root, key, actual, dest)
            return dest
        print(f"sceneparse: cached {dest} is corrupted (sha256 {actual}, expected {expected}); "
              "deleted it, downloading it again", file=sys.stderr)
        with _writing_to(root):
            dest.unlink()

    with _writing_to(root):
        dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    # network and read errors become SceneparseErrors inside; an OSError that escapes is the .part file
    with _writing_to(root):
        _download(url, part, dest, progress)
    actual = sha256_file(part)
    if expected is not None and actual != expected:
        part.unlink()
        hint = "try again later, or check the URL"
        if sha256 is None:
            hint = (f"the file on the server is not the one recorded in {root / MANIFEST}; if it changed "
                    f"on purpose, delete the entry {key!r} there and run again")
        raise SceneparseError(
            f"checksum mismatch for {url}: sha256 {actual}, expected {expected}; "
            "the downloaded file was deleted", hint=hint)
    with _writing_to(root):
        os.replace(part, dest)
    _record_hash(root, key, actual, dest)  # always: the new file has a new mtime
    return dest


def _download(url: str, part: Path, dest: Path, progress: bool, _retry: bool = True) -> None:
    """Stream `url` into `part`, resuming from the bytes already there when the server allows it."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "sceneparse"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()  # an HTTPError holds the open response
        if err.code == 416 and offset and _retry:  # .part already as long as (or longer than) the file
            part.unlink()
            return _download(url, part, dest, progress, _retry=False)
        if err.code == 404:
            raise SceneparseError(f"{url} does not exist on the server (HTTP 404)",
                                  hint="check the model name and the zoo URL (SCENEPARSE_ZOO_URL)") from err
        raise SceneparseError(f"downloading {url} failed: HTTP {err.code} {err.reason}",
                              hint="try again later") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise OfflineError(
            f"cannot download {url}: {reason}",
            hint=f"if this machine is offline, fetch {url} by hand and save it as {dest}") from err

    with response:
        resuming = bool(offset) and response.status == 206
        if resuming and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            if not _retry:
                raise SceneparseError(f"{url}: the server answered a resume request with the wrong range")
            response.close()
            part.unlink()
            return _download(url, part, dest, progress, _retry=False)
        if not resuming:
            offset = 0  # a 200 answer is the whole file: a server that ignores Range; start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if resuming else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=dest.name, disable=not progress, file=sys.stderr,
        ) as bar:
            try:
                while block := response.read(CHUNK):
                    f.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as err:
                raise _interrupted(url, part, err) from err
    if total is not None and part.stat().st_size != total:
        raise _interrupted(url, part, f"got {part.stat().st_size} of {total} bytes")


def _interrupted(url: str, part: Path, why) -> SceneparseError:
    return SceneparseError(f"download of {url} was interrupted ({why}); the partial file {part} is kept",
                           hint="run the same command again to resume")


# --- published models -------------------------------------------------------------------------

def raw_paths(entry: ZooEntry, cache_dir=None) -> tuple[Path, Path]:
    """Where CSAIL's encoder and decoder files of `entry` live in the cache."""
    folder = _root(cache_dir) / entry.folder
    return folder / entry.filenames[0], folder / entry.filenames[1]


def checkpoint_path(entry: ZooEntry, cache_dir=None) -> Path:
    """Where the converted sceneparse checkpoint of `entry` lives in the cache."""
    return _root(cache_dir) / f"{entry.name}.pt"


def cache_state(name: str, cache_dir=None) -> str:
    """'converted', 'raw' (CSAIL files present, not yet converted) or 'missing'."""
    entry = get_entry(name)
    if checkpoint_path(entry, cache_dir).exists():
        return "converted"
    if all(p.exists() for p in raw_paths(entry, cache_dir)):
        return "raw"
    return "missing"


def missing_model_message(name: str, cache_dir=None) -> str:
    """What to tell a user who asked for a published model that is not in the cache."""
    entry = get_entry(name)
    encoder_url, decoder_url = entry.urls()
    folder = raw_paths(entry, cache_dir)[0].parent
    return (
        f"model {entry.name!r} is not in the cache ({_root(cache_dir)}). Download it with "
        f"`sceneparse zoo download {entry.name}`, or, offline, fetch these two files by hand:\n"
        f"  {encoder_url}\n  {decoder_url}\n"
        f"and put them in {folder}/ (sceneparse converts them on first use)"
    )


def _convert(entry: ZooEntry, cache_dir, output: Path) -> None:
    """CSAIL's two cached files of `entry` -> `output`. Files that cannot be read at all (truncated
    by a server that sent no length, or put there by hand) leave the cache, hash record included:
    otherwise `zoo download` would keep trusting them. Any other failure (a full disk while
    writing `output`, a file that reads but does not fit) leaves them where they are."""
    # Imported here: conversion needs torch and the model code, the rest of the zoo does not.
    from sceneparse.zoo.csail import convert_csail_files

    encoder, decoder = raw_paths(entry, cache_dir)
    try:
        convert_csail_files(encoder, decoder, entry.name, output)
    except UnreadableFileError as err:
        root = _root(cache_dir)
        # only the file the error names: a good encoder (hundreds of MB, maybe copied by hand) stays
        bad = [path for path in (encoder, decoder) if str(path) in err.message] or [encoder, decoder]
        for path in bad:
            _forget(root, path.relative_to(root).as_posix())
        raise SceneparseError(
            f"{err.message}\n(removed from the cache {root}: {', '.join(path.name for path in bad)})",
            f"download it again (sceneparse zoo download {entry.name}), or, offline, put a good copy "
            f"in {bad[0].parent}/",
        ) from None


def _forget(root: Path, key: str) -> None:
    """Delete a cached file and its hash record."""
    with _writing_to(root):
        (root / key).unlink(missing_ok=True)
    manifest = _read_manifest(root)
    if manifest.pop(key, None) is not None:
        _write_manifest(root, manifest)


def download_model(name: str, cache_dir=None, progress: bool = True) -> Path:
    """Fetch (or reuse) CSAIL's encoder and decoder files of a published model, convert them to one
    sceneparse checkpoint `<cache>/<name>.pt` and return its path."""
    entry = get_entry(name)
    output = checkpoint_path(entry, cache_dir)
    if output.exists():
        return output
    for url, path in zip(entry.urls(), raw_paths(entry, cache_dir)):
        try:
            fetch(url, cache_dir=cache_dir, progress=progress, filename=f"{entry.folder}/{path.name}")
        except OfflineError as err:
            raise SceneparseError(f"cannot reach the model server ({err.message}).\n"
                                  + missing_model_message(name, cache_dir)) from err
    _convert(entry, cache_dir, output)
    return output


def resolve(name: str, cache_dir=None, missing_ok: bool = False) -> Path | None:
    """The cached checkpoint of a published model, converting CSAIL files already in the cache
    (no network). When nothing is cached: SceneparseError saying what to download and where to put
    it, or None with `missing_ok=True`. Unknown names always raise SceneparseError."""
    entry = get_entry(name)
    output = checkpoint_path(entry, cache_dir)
    if output.exists():
        return output
    encoder, decoder = raw_paths(entry, cache_dir)
    if encoder.exists() and decoder.exists():
        _convert(entry, cache_dir, output)
        return output
    if missing_ok:
        return None
    raise SceneparseError(missing_model_message(name, cache_dir))


__all__ = [
    "OfflineError", "cache_key", "cache_state", "checkpoint_path", "default_cache_dir", "download_model",
    "fetch", "missing_model_message", "raw_paths", "resolve", "sha256_file",
]
