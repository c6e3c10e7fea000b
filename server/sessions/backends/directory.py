"""``DirectoryBackend``: a local directory (a PersistentVolume on Kubernetes), one process at a
time (an exclusive ``flock``), so it needs no version checks on reads.

Log appends are ``write`` + ``fsync``; snapshots are written to a temporary file, fsynced and
renamed, then the directory is fsynced. A torn record at the end of a log (a crash in the
middle of an append, never acknowledged) fails its CRC and is cut off on load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Optional

from server.keys import split_key, tenant_name
from server.sessions import codec
from server.sessions.backends.base import Backend, Head, Stored, StoreError

log = logging.getLogger("fwserve.store")


_FRAME = struct.Struct("<II")  # payload length, crc32(payload)
_NAME = re.compile(r"^([A-Za-z0-9_-]{1,64})\.([0-9a-f]{40})\.safetensors$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_head(path: Path) -> Optional[bytes]:
    """The first bytes of a snapshot file up to the end of its safetensors header (None: no file)."""
    try:
        with open(path, "rb") as f:
            lead = f.read(8)
            n = int.from_bytes(lead, "little") if len(lead) == 8 else 0
            return lead + f.read(min(n, 100_000_000))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"reading {path}: {e}") from e


def frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_frames(data: bytes) -> tuple[list[bytes], int]:
    """Complete, intact frames and the length of the good prefix (a torn tail is cut there)."""
    out, at = [], 0
    while at + _FRAME.size <= len(data):
        n, crc = _FRAME.unpack_from(data, at)
        end = at + _FRAME.size + n
        if end > len(data):
            break
        payload = data[at + _FRAME.size:end]
        if zlib.crc32(payload) != crc:
            break
        out.append(payload)
        at = end
    return out, at


class DirectoryBackend(Backend):
    """``<root>/<tenant>.<sha256(key)[:40]>.safetensors`` (snapshot) and ``.wal`` (log) files."""

    shared = False

    def __init__(self, root: Path, fsync: bool = True, exclusive: bool = True) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd: Optional[int] = None
        if exclusive:
            import fcntl

            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise StoreError(f"store directory {self.root} is in use by another fwserve process "
                                 "(a directory store serves one replica; use redis:// to share)") from None
            self._lock_fd = fd
        self._counts: dict[str, int] = {}
        self._heads: dict[str, Head] = {}  # known heads of the keys this process wrote or read
        for p in self.root.glob("*.safetensors"):
            m = _NAME.match(p.name)
            if m:
                self._counts[m.group(1)] = self._counts.get(m.group(1), 0) + 1

    def _base(self, key: str) -> str:
        tenant, _ = split_key(key)
        return f"{tenant_name(tenant)}.{hashlib.sha256(key.encode()).hexdigest()[:40]}"

    def _snap(self, key: str) -> Path:
        return self.root / (self._base(key) + ".safetensors")

    def _wal(self, key: str) -> Path:
        return self.root / (self._base(key) + ".wal")

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
        if self.fsync:
            _fsync_dir(self.root)

    def heads(self, keys):
        out = {}
        for k in keys:
            if k not in self._heads:
                s = self.load(k)
                if s is None:
                    out[k] = None
                    continue
            out[k] = self._heads.get(k)
        return out

    def load(self, key: str) -> Optional[Stored]:
        try:
            snapshot = self._snap(key).read_bytes()
        except FileNotFoundError:
            self._heads.pop(key, None)
            return None
        except OSError as e:
            raise StoreError(f"reading {self._snap(key)}: {e}") from e
        inc, snap_version = codec.snapshot_head(snapshot)
        records: list[bytes] = []
        wal = self._wal(key)
        try:
            data = wal.read_bytes()
        except FileNotFoundError:
            data = b""
        if data:
            records, good = read_frames(data)
            if good < len(data):  # a torn append (never acknowledged): cut it off
                log.warning("store %s: cutting a torn log record off %s (%d bytes)", self.root, wal.name,
                            len(data) - good)
                with open(wal, "r+b") as f:
                    f.truncate(good)
                    if self.fsync:
                        os.fsync(f.fileno())
        # the head: the snapshot plus the records of its incarnation that follow it in order
        version = snap_version
        for r in records:
            r_inc, r_v = codec.record_head(r)
            if r_inc == inc and r_v == version + 1:
                version = r_v
        self._heads[key] = Head(inc, version)
        return Stored(inc, version, snap_version, snapshot, records)

    def create(self, key, inc, snapshot, max_tenant=0, max_total=0):
        if self._snap(key).exists():
            return "exists"
        tenant = tenant_name(split_key(key)[0])
        if max_tenant and self._counts.get(tenant, 0) >= max_tenant:
            return "tenant_quota"
        if max_total and sum(self._counts.values()) >= max_total:
            return "limit"
        self._wal(key).unlink(missing_ok=True)
        self._write(key, inc, 0, snapshot)
        return "ok"

    def _write(self, key: str, inc: str, version: int, snapshot: bytes) -> None:
        path = self._snap(key)
        new = not path.exists()
        try:
            self._write_atomic(path, snapshot)
        except OSError as e:
            raise StoreError(f"writing {path}: {e}") from e
        if new:
            t = tenant_name(split_key(key)[0])
            self._counts[t] = self._counts.get(t, 0) + 1
        self._heads[key] = Head(inc, version)

    def put(self, key, inc, version, snapshot, expect=None):
        if expect is not None and self.heads([key]).get(key) != expect:
            return False
        self._write(key, inc, version, snapshot)
        wal = self._wal(key)
        if wal.exists():  # records up to `version` are in the snapshot now (the rest: none while we hold the lock)
            keep = [r for r in read_frames(wal.read_bytes())[0] if codec.record_head(r)[0] == inc
                    and codec.record_head(r)[1] > version]
            if keep:
                self._write_atomic(wal, b"".join(frame(r) for r in keep))
                self._heads[key] = Head(inc, version + len(keep))
            else:
                wal.unlink()
        return True

    def append(self, batch):
        for key, (expect, records) in batch.items():
            wal = self._wal(key)
            new = not wal.exists()
            try:
                with open(wal, "ab") as f:
                    f.write(b"".join(frame(r) for r in records))
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                if new and self.fsync:
                    _fsync_dir(self.root)
            except OSError as e:
                raise StoreError(f"appending to {wal}: {e}") from e
            self._heads[key] = Head(expect.inc, expect.version + len(records))
        return set()

    def delete(self, key):
        path = self._snap(key)
        existed = path.exists()
        self._wal(key).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        if existed:
            t = tenant_name(split_key(key)[0])
            self._counts[t] = max(0, self._counts.get(t, 0) - 1)
        self._heads.pop(key, None)
        return existed

    def count(self, tenant=None):
        if tenant is not None:
            return self._counts.get(tenant_name(tenant), 0)
        return sum(self._counts.values())

    def keys(self, tenant):
        out = []
        for path in self.root.glob(f"{tenant_name(tenant)}.*.safetensors"):
            head = _read_head(path)
            if head is None or not _NAME.match(path.name):
                continue
            try:
                key = codec.read_meta(head).get("key")
            except codec.CodecError:
                log.warning("store %s: %s is not a session snapshot; not listed", self.root, path.name)
                continue
            if isinstance(key, str) and split_key(key)[0] == tenant:
                out.append(key)
        return out

    def snapshot_meta(self, keys):
        return {k: _read_head(self._snap(k)) for k in keys}

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
