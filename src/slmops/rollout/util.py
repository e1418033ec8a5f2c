"""Small helpers shared by the rollout modules: atomic JSON writes, hashing, reading a file or URL."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from slmops.errors import BadInputError, SlmopsError

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync, then ``os.replace``:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_atomic(path, dumps(data))


def check_version(version: str) -> str:
    if not VERSION_RE.match(version or ""):
        raise BadInputError(f"bad version {version!r}",
                            "use 1-64 letters, digits, '.', '_', '+' or '-', e.g. v2 or 2026.11.29-1")
    return version


def check_device_id(device_id: str) -> str:
    if not DEVICE_RE.match(device_id or ""):
        raise BadInputError(f"bad device id {device_id!r}", "use letters, digits, '.', '_', ':', '@' or '-'")
    return device_id


def safe_relpath(rel: str) -> str:
    """A relative posix path that stays inside its folder (no '..', no absolute path), else BadInputError."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or rel.startswith("~"):
        raise SlmopsError(f"unsafe path {rel!r} in a bundle manifest", "the index may have been tampered with")
    return p.as_posix()


def is_url(ref: str | Path) -> bool:
    return str(ref).startswith(("http://", "https://"))


def join_ref(base: str | Path, rel: str) -> str:
    """`rel` (a posix path relative to the index root) under `base` (an http(s) URL or a folder)."""
    rel = safe_relpath(rel)
    if is_url(base):
        return str(base).rstrip("/") + "/" + quote(rel)
    return str(Path(base) / rel)


def read_bytes(ref: str | Path, timeout: float = 30.0, limit: int | None = None) -> bytes:
    """The bytes of a file path or an http(s) URL (raises SlmopsError naming the reference)."""
    ref = str(ref)
    if is_url(ref):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(ref, timeout=timeout) as resp:  # noqa: S310 - http(s) only
                return resp.read(limit) if limit else resp.read()
        except urllib.error.HTTPError as exc:
            raise SlmopsError(f"GET {ref}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SlmopsError(f"GET {ref}: {getattr(exc, 'reason', exc)}") from None
    try:
        return Path(ref).read_bytes()
    except OSError as exc:
        raise SlmopsError(f"cannot read {ref}: {exc.strerror or exc}") from None


def copy_to(ref: str | Path, dest: Path, timeout: float = 60.0) -> str:
    """Copy a file path or http(s) URL to `dest` in chunks; returns the sha256 of what was written."""
    h = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ref = str(ref)
    with dest.open("wb") as out:
        if is_url(ref):
            import urllib.error
            import urllib.request

            try:
                with urllib.request.urlopen(ref, timeout=timeout) as resp:  # noqa: S310
                    while block := resp.read(1 << 20):
                        h.update(block)
                        out.write(block)
            except urllib.error.HTTPError as exc:
                raise SlmopsError(f"GET {ref}: HTTP {exc.code}") from None
            except (urllib.error.URLError, OSError) as exc:
                raise SlmopsError(f"GET {ref}: {getattr(exc, 'reason', exc)}") from None
        else:
            try:
                with open(ref, "rb") as src:
                    while block := src.read(1 << 20):
                        h.update(block)
                        out.write(block)
            except OSError as exc:
                raise SlmopsError(f"cannot read {ref}: {exc.strerror or exc}") from None
    return h.hexdigest()
