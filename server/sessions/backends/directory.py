"""``DirectoryBackend``: a local directory (a PersistentVolume on Kubernetes), one process at a
time (an exclusive ``flock``), so it needs no version checks on reads.

Log appends are ``write`` + ``fsync``; snapshots are written to a temporary file, fsynced and
renamed, then the directory is fsynced. A torn record at the end of a log (a crash in the
middle of an append, never acknowledged) fails its CRC and is cut off on load. An archived
snapshot is a hard link to the snapshot it was (``<stem>.v<version>.safetensors``), made before
the new snapshot replaces it, so a crash in between leaves both.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Optional

from server.keys import TENANT_PATTERN, split_key, tenant_name
from server.sessions import codec
from server.sessions.backends.base import Backend, Head, Stored, StoreError

log = logging.getLogger("fwserve.store")


_FRAME = struct.Struct("<II")  # payload length, crc32(payload)
_NAME = re.compile(r"^([A-Za-z0-9_-]{1,64})\.([0-9a-f]{40})\.safetensors$")
_ARCHIVE = re.compile(r"\.v([0-9]{1,16})\.safetensors$")


def _tenant_part(tenant: Optional[str]) -> str:
    """The tenant as it may appear in a file name (a tenant that is not a valid name is hashed)."""
    name = tenant_name(tenant)
    if re.fullmatch(TENANT_PATTERN[1:-1], name):
        return name
    return "h" + hashlib.sha256(name.encode()).hexdigest()[:32]


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

    def __init__(self, root: Path, fsync: bool = True, exclusive: bool = True, max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.fsync = fsync
        self.max_bytes = max_bytes  # 0: the disk is the limit
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
        # Idempotency-Key claims: in memory, and with `exclusive` (the store is this process's and
        # durable) in an append-only file, replayed at start and rewritten when mostly stale
        self._claims: dict[str, dict[str, dict]] = {}
        self._claims_path = self.root / "idempotency.jsonl" if exclusive else None
        self._claim_lines = 0
        if self._claims_path is not None:
            self._load_claims()
        self._counts: dict[str, int] = {}
        self._heads: dict[str, Head] = {}  # known heads of the keys this process wrote or read
        self._used = 0  # bytes of the store's files (the --store-max-bytes cap)
        for p in self.root.iterdir():
            if p.suffix in (".safetensors", ".wal", ".jsonl"):
                self._used += p.stat().st_size
            m = _NAME.match(p.name)
            if m:
                self._counts[m.group(1)] = self._counts.get(m.group(1), 0) + 1

    def _reserve(self, path: Path, new_size: int, append: bool = False) -> int:
        """Bytes a write of `path` adds; OSError(ENOSPC) beyond --store-max-bytes, like a full disk."""
        try:
            old = 0 if append else path.stat().st_size
        except FileNotFoundError:
            old = 0
        delta = new_size - old
        if self.max_bytes and delta > 0 and self._used + delta > self.max_bytes:
            raise OSError(errno.ENOSPC, f"the store holds its maximum of {self.max_bytes} bytes")
        return delta

    def _base(self, key: str) -> str:
        """File name stem: the tenant (for counting) and a hash of the key (any id is safe)."""
        return f"{_tenant_part(split_key(key)[0])}.{hashlib.sha256(key.encode()).hexdigest()[:40]}"

    def _snap(self, key: str) -> Path:
        return self.root / (self._base(key) + ".safetensors")

    def _wal(self, key: str) -> Path:
        return self.root / (self._base(key) + ".wal")

    def _archive(self, key: str, version: int) -> Path:
        return self.root / f"{self._base(key)}.v{version}.safetensors"

    def _archives(self, key: str) -> dict[int, Path]:
        out = {}
        for path in self.root.glob(self._base(key) + ".v*.safetensors"):
            m = _ARCHIVE.search(path.name)
            if m:
                out[int(m.group(1))] = path
        return out

    def _write_atomic(self, path: Path, data: bytes) -> None:
        delta = self._reserve(path, len(data))
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
        self._used += delta
        if self.fsync:
            _fsync_dir(self.root)

    def heads(self, keys):
        out = {}
        for k in keys:
            if k not in self._heads:
                try:
                    if self.load(k) is None:
                        out[k] = None
                        continue
                except StoreError as e:  # this session only
                    out[k] = e
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
        try:
            inc, snap_version = codec.snapshot_head(snapshot)
        except (codec.CodecError, KeyError, ValueError) as e:
            raise StoreError(f"{self._snap(key).name}: not a session snapshot ({e})") from None
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
            try:
                r_inc, r_v = codec.record_head(r)
            except (codec.CodecError, KeyError, ValueError):
                break  # an unreadable record ends the usable log
            if r_inc == inc and r_v == version + 1:
                version = r_v
        self._heads[key] = Head(inc, version)
        return Stored(inc, version, snap_version, snapshot, records, sorted(self._archives(key)))

    def history(self, key):
        stored = self.load(key)
        if stored is None:
            return None
        stored.anchors = {stored.snap_version: stored.snapshot}
        for version, path in self._archives(key).items():
            try:
                stored.anchors.setdefault(version, path.read_bytes())
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StoreError(f"reading {path}: {e}") from e
        return stored

    def create(self, key, inc, snapshot, max_tenant=0, max_total=0):
        if self._snap(key).exists():
            return "exists"
        tenant = _tenant_part(split_key(key)[0])
        if max_tenant and self._counts.get(tenant, 0) >= max_tenant:
            return "tenant_quota"
        if max_total and sum(self._counts.values()) >= max_total:
            return "limit"
        self._wal(key).unlink(missing_ok=True)
        for path in self._archives(key).values():
            self._unlink(path)
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
            t = _tenant_part(split_key(key)[0])
            self._counts[t] = self._counts.get(t, 0) + 1
        self._heads[key] = Head(inc, version)

    def put(self, key, inc, version, snapshot, expect=None, keep_from=None):
        if expect == "absent":
            if self._snap(key).exists():
                return False
        elif expect is not None and self.heads([key]).get(key) != expect:
            return False
        head = self._heads.get(key) if keep_from is None else self.heads([key]).get(key)
        same = isinstance(head, Head) and head.inc == inc
        if keep_from is not None and same:
            self._archive_current(key, version, keep_from)
        self._write(key, inc, version, snapshot)
        for v, path in self._archives(key).items():
            if keep_from is None or not same or v < keep_from:
                self._unlink(path)
        top = max(version, head.version) if same else version
        wal = self._wal(key)
        if wal.exists():  # the history kept, and records after `version` (none while we hold the lock)
            keep = []
            for r in read_frames(wal.read_bytes())[0]:
                r_inc, r_v = codec.record_head(r)
                if r_inc == inc and (r_v > version or (keep_from is not None and r_v > keep_from)):
                    keep.append(r)
            if keep:
                self._write_atomic(wal, b"".join(frame(r) for r in keep))
            else:
                self._unlink(wal)
            top = max([top] + [codec.record_head(r)[1] for r in keep])
        self._heads[key] = Head(inc, top)
        return True

    def _archive_current(self, key: str, version: int, keep_from: int) -> None:
        """Keep the snapshot about to be replaced as a history anchor (a hard link: no copy)."""
        snap = self._snap(key)
        try:
            _, current = codec.snapshot_head(_read_head(snap) or b"")
        except (codec.CodecError, KeyError, ValueError):
            return
        if current < keep_from or current == version:
            return
        dst = self._archive(key, current)
        try:
            delta = self._reserve(dst, snap.stat().st_size)
            tmp = dst.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            os.link(snap, tmp)
            tmp.replace(dst)
            self._used += delta
        except OSError as e:
            raise StoreError(f"archiving {snap.name}: {e}") from e

    def append(self, batch):
        failed = {}
        for key, (expect, records) in batch.items():
            wal = self._wal(key)
            new = not wal.exists()
            data = b"".join(frame(r) for r in records)
            try:
                self._reserve(wal, len(data), append=True)
                with open(wal, "ab") as f:
                    at = f.tell()
                    try:
                        f.write(data)
                        if self.fsync:
                            f.flush()
                            os.fsync(f.fileno())
                    except OSError:
                        f.truncate(at)  # a partial append must not stay behind a later one
                        raise
                if new and self.fsync:
                    _fsync_dir(self.root)
            except OSError as e:
                failed[key] = f"error: appending to {wal.name}: {e}"
                continue
            self._used += len(data)
            self._heads[key] = Head(expect.inc, expect.version + len(records))
        return failed

    def delete(self, key):
        path = self._snap(key)
        existed = path.exists()
        for p in (self._wal(key), *self._archives(key).values(), path):
            self._unlink(p)
        if existed:
            t = _tenant_part(split_key(key)[0])
            self._counts[t] = max(0, self._counts.get(t, 0) - 1)
        self._heads.pop(key, None)
        return existed

    def count(self, tenant=None):
        if tenant is not None:
            return self._counts.get(_tenant_part(tenant), 0)
        return sum(self._counts.values())

    def _unlink(self, path: Path) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        path.unlink(missing_ok=True)
        self._used -= size

    def touch(self, keys):
        for key in keys:
            try:
                os.utime(self._snap(key))
            except FileNotFoundError:
                pass

    def expire_idle(self, before, keep):
        keep_bases = {self._base(k) for k in keep}
        gone = []
        for snap in list(self.root.glob("*.safetensors")):
            base = snap.name[:-len(".safetensors")]
            if base in keep_bases or not _NAME.match(snap.name):
                continue
            wal = self.root / (base + ".wal")
            try:
                last = max(snap.stat().st_mtime, wal.stat().st_mtime if wal.exists() else 0.0)
                if last >= before:
                    continue
                meta = codec.read_meta(snap.read_bytes())
                key = str(meta["key"])
            except (OSError, codec.CodecError, KeyError):
                continue
            tenant = split_key(key)[0]
            self.unclaim(tenant, [e["key"] for e in meta.get("idempotency", ())]
                         + ([meta["create_idempotency"]["key"]] if meta.get("create_idempotency") else []))
            if self.delete(key):
                gone.append(key)
        return gone

    def claims(self, tenant, keys):
        table, now = self._claims.get(_tenant_part(tenant), {}), time.time()
        return {k: table[k] for k in keys if k in table and table[k]["expires"] > now}

    def claim(self, tenant, claims):
        table = self._claims.setdefault(_tenant_part(tenant), {})
        now, lines = time.time(), []
        for key, c in claims.items():
            prev = table.get(key)
            if prev is None or prev["expires"] <= now:
                table[key] = c
                lines.append({"t": _tenant_part(tenant), "k": key, **c})
        self._write_claims(lines)

    def unclaim(self, tenant, keys):
        table = self._claims.get(_tenant_part(tenant), {})
        gone = [k for k in keys if table.pop(k, None) is not None]
        self._write_claims([{"t": _tenant_part(tenant), "k": k, "del": True} for k in gone])

    def _write_claims(self, lines: list[dict]) -> None:
        if not lines or self._claims_path is None:
            return
        live = sum(len(t) for t in self._claims.values())
        try:
            if self._claim_lines + len(lines) > 2 * live + 1024:  # mostly stale: rewrite the live ones
                now = time.time()
                rows = [{"t": t, "k": k, **c} for t, table in self._claims.items() for k, c in table.items()
                        if c["expires"] > now]
                self._write_atomic(self._claims_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
                self._claim_lines = len(rows)
                return
            data = "".join(json.dumps(r) + "\n" for r in lines).encode()
            self._used += self._reserve(self._claims_path, len(data), append=True)
            with open(self._claims_path, "ab") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            self._claim_lines += len(lines)
        except OSError as e:
            raise StoreError(f"writing {self._claims_path.name}: {e}") from e

    def _load_claims(self) -> None:
        try:
            text = self._claims_path.read_text()
        except FileNotFoundError:
            return
        now = time.time()
        for line in text.splitlines():
            try:
                r = json.loads(line)
                table = self._claims.setdefault(r.pop("t"), {})
                key = r.pop("k")
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a torn last line (a crash mid-append): never acknowledged
            if r.get("del"):
                table.pop(key, None)
            elif r.get("expires", 0) > now:
                table[key] = r
            self._claim_lines += 1

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
