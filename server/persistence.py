"""Session persistence: one interface, two backends, chosen by ``--store``.

The store below the device and host tiers holds, per session key (``id``, or ``tenant/id``
when API keys are on):

- a **head**: ``(incarnation, version)``. The incarnation is a random id given at create,
  import and reset; the version counts adapts. The pair is the compare-and-set token of the
  multi-replica protocol: a replica's copy of a session is current exactly when the store's
  head equals the copy's ``(incarnation, synced version)``.
- a **snapshot**: the session export (safetensors of W, b and rule state, JSON metadata with
  the version) at version ``snap_version``.
- a **write-ahead log** (``--durability wal``): one record per adapt after the snapshot, for
  versions ``snap_version + 1 .. version`` in order. A record is opaque bytes here (the store
  encodes the adapt's features, labels and statistics, see ``server.store``).

``DirectoryBackend`` (a local directory; a PersistentVolume on Kubernetes) is used by one
process at a time (an exclusive ``flock``), so it needs no version checks on reads. Log
appends are ``write`` + ``fsync``; snapshots are written to a temporary file, fsynced and
renamed, then the directory is fsynced. A torn record at the end of a log (a crash in the
middle of an append, never acknowledged) fails its CRC and is cut off on load.

``RedisBackend`` (``redis://host:port/db``) is shared by replicas. Every write is one Lua
script, so it is atomic and compare-and-set on the head; a replica checks the heads of the
sessions of a micro-batch with one pipelined ``HMGET`` round trip before serving them.
Durability of an acknowledged write is Redis's: run it with ``appendonly yes`` and
``appendfsync always`` (the reply to a write comes after its AOF fsync).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger("fwserve.persistence")

TENANT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
NO_TENANT = "_"  # storage name of sessions created while auth is off


@dataclass(frozen=True)
class Head:
    inc: str
    version: int


@dataclass
class Stored:
    """What the store holds for one session."""

    inc: str
    version: int
    snap_version: int
    snapshot: bytes
    records: list[bytes] = field(default_factory=list)  # raw log records after the snapshot (may hold leftovers)


class StoreError(Exception):
    """The store could not be read or written (disk full, Redis unreachable, ...)."""


def split_key(key: str) -> tuple[Optional[str], str]:
    """'tenant/id' -> (tenant, id); 'id' -> (None, id)."""
    tenant, sep, sid = key.rpartition("/")
    return (tenant if sep else None), sid


def tenant_name(tenant: Optional[str]) -> str:
    return tenant or NO_TENANT


class Backend:
    """The interface; see the module docstring. Keys are session keys (``id`` or ``tenant/id``)."""

    shared = False  # may other processes write the same sessions (do reads need a version check)?
    url = ""

    def heads(self, keys: Iterable[str]) -> dict[str, Optional[Head]]:
        raise NotImplementedError

    def load(self, key: str) -> Optional[Stored]:
        raise NotImplementedError

    def create(self, key: str, inc: str, snapshot: bytes, max_tenant: int = 0, max_total: int = 0) -> str:
        """Write a new session at version 0 unless it exists or a quota is full:
        -> 'ok' | 'exists' | 'tenant_quota' | 'limit'."""
        raise NotImplementedError

    def put(self, key: str, inc: str, version: int, snapshot: bytes, expect: Optional[Head] = None) -> bool:
        """Snapshot at `version` becomes the session's state (created if absent); log records up to
        `version` of the same incarnation are dropped. With `expect`, only if the head equals it."""
        raise NotImplementedError

    def append(self, batch: dict[str, tuple[Head, list[bytes]]]) -> set[str]:
        """Append log records per key, each key only if its head equals the given one; the head's
        version advances by the number of records. -> the keys that were not appended (conflict)."""
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        raise NotImplementedError

    def count(self, tenant: Optional[str] = None) -> int:
        """Sessions stored, of one tenant or in all."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        raise NotImplementedError

    def clear(self) -> None:
        """Remove every session (none mode: the spill tier is emptied at exit)."""
        for k in self.keys():
            self.delete(k)

    def close(self) -> None:
        pass


def open_backend(url: str, *, fsync: bool = True, exclusive: bool = True, namespace: str = "fwserve") -> Backend:
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBackend(url, namespace=namespace)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return DirectoryBackend(Path(url), fsync=fsync, exclusive=exclusive)


# ---- directory ------------------------------------------------------------------------------

_FRAME = struct.Struct("<II")  # payload length, crc32(payload)
_NAME = re.compile(r"^([A-Za-z0-9_-]{1,64})\.([0-9a-f]{40})\.safetensors$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        from server.store import snapshot_head

        inc, snap_version = snapshot_head(snapshot)
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
        from server.store import record_head

        version = snap_version
        for r in records:
            r_inc, r_v = record_head(r)
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
            from server.store import record_head

            keep = [r for r in read_frames(wal.read_bytes())[0]
                    if record_head(r)[0] == inc and record_head(r)[1] > version]
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

    def keys(self):
        from server.store import snapshot_key

        out = []
        for p in self.root.glob("*.safetensors"):
            try:
                out.append(snapshot_key(p.read_bytes()))
            except Exception:  # pragma: no cover - not a session snapshot
                continue
        return out

    def clear(self):
        for p in list(self.root.glob("*.safetensors")) + list(self.root.glob("*.wal")):
            p.unlink(missing_ok=True)
        self._counts.clear()
        self._heads.clear()

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


# ---- redis ----------------------------------------------------------------------------------

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
local mt = tonumber(ARGV[4])
local mx = tonumber(ARGV[5])
if mt > 0 and redis.call('SCARD', KEYS[3]) >= mt then return 'tenant_quota' end
if mx > 0 and tonumber(redis.call('GET', KEYS[4]) or '0') >= mx then return 'limit' end
redis.call('HSET', KEYS[1], 'inc', ARGV[1], 'ver', 0, 'snap', ARGV[2], 'snap_ver', 0)
redis.call('DEL', KEYS[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('INCR', KEYS[4])
return 'ok'
"""

_PUT = """
if ARGV[5] ~= '' then
  local h = redis.call('HMGET', KEYS[1], 'inc', 'ver')
  if h[1] ~= ARGV[5] or tonumber(h[2]) ~= tonumber(ARGV[6]) then return 0 end
end
local old = redis.call('HMGET', KEYS[1], 'inc', 'snap_ver')
redis.call('HSET', KEYS[1], 'inc', ARGV[1], 'ver', ARGV[2], 'snap', ARGV[3], 'snap_ver', ARGV[2])
if old[1] == ARGV[1] then
  local drop = tonumber(ARGV[2]) - tonumber(old[2])
  if drop > 0 then redis.call('LTRIM', KEYS[2], drop, -1) end
else
  redis.call('DEL', KEYS[2])
end
if not old[1] then
  redis.call('SADD', KEYS[3], ARGV[4])
  redis.call('INCR', KEYS[4])
end
return 1
"""

_APPEND = """
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver')
if h[1] ~= ARGV[1] or tonumber(h[2]) ~= tonumber(ARGV[2]) then return 0 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HSET', KEYS[1], 'ver', tonumber(ARGV[2]) + #ARGV - 2)
return 1
"""

_DELETE = """
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('DECR', KEYS[4])
  return 1
end
return 0
"""


class RedisBackend(Backend):
    """Keys: ``<ns>:s:<key>`` hash (inc, ver, snap, snap_ver), ``<ns>:w:<key>`` list (log),
    ``<ns>:t:<tenant>`` set (the tenant's keys), ``<ns>:n`` (session count)."""

    shared = True

    def __init__(self, url: str, namespace: str = "fwserve") -> None:
        try:
            import redis
        except ImportError:  # pragma: no cover - an install without the redis extra
            raise StoreError("a redis:// store needs the redis package (pip install 'fwserve[redis]')") from None
        self._redis_errors = (redis.RedisError, OSError)
        self.url = url
        self.ns = namespace
        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        try:
            self.r.ping()
        except self._redis_errors as e:
            raise StoreError(f"cannot reach redis at {url}: {e}") from e
        self._create = self.r.register_script(_CREATE)
        self._put = self.r.register_script(_PUT)
        self._append = self.r.register_script(_APPEND)
        self._delete = self.r.register_script(_DELETE)

    def durability_warning(self) -> Optional[str]:
        """A warning when the server's AOF settings do not make acknowledged writes durable."""
        try:
            aof = self.r.config_get("appendonly").get("appendonly")
            fs = self.r.config_get("appendfsync").get("appendfsync")
        except self._redis_errors:
            return None  # CONFIG may be disabled (managed Redis): nothing to check
        if aof != "yes" or fs != "always":
            return (f"redis at {self.url} runs with appendonly={aof} appendfsync={fs}: an acknowledged adapt can "
                    "be lost if redis crashes; use appendonly yes + appendfsync always for --durability wal")
        return None

    def _k(self, key: str) -> list[str]:
        tenant = tenant_name(split_key(key)[0])
        return [f"{self.ns}:s:{key}", f"{self.ns}:w:{key}", f"{self.ns}:t:{tenant}", f"{self.ns}:n"]

    def _call(self, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except self._redis_errors as e:
            raise StoreError(f"redis: {type(e).__name__}: {e}") from e

    def heads(self, keys):
        keys = list(keys)
        if not keys:
            return {}

        def run():
            p = self.r.pipeline(transaction=False)
            for k in keys:
                p.hmget(self._k(k)[0], "inc", "ver")
            return p.execute()

        out = {}
        for k, (inc, ver) in zip(keys, self._call(run)):
            out[k] = None if inc is None else Head(inc.decode(), int(ver))
        return out

    def load(self, key):
        hk, wk = self._k(key)[:2]

        def run():
            p = self.r.pipeline(transaction=True)
            p.hmget(hk, "inc", "ver", "snap_ver", "snap")
            p.lrange(wk, 0, -1)
            return p.execute()

        (inc, ver, sv, snap), records = self._call(run)
        if inc is None:
            return None
        return Stored(inc.decode(), int(ver), int(sv), snap, list(records))

    def create(self, key, inc, snapshot, max_tenant=0, max_total=0):
        res = self._call(self._create, keys=self._k(key), args=[inc, snapshot, key, max_tenant, max_total])
        return res.decode() if isinstance(res, bytes) else str(res)

    def put(self, key, inc, version, snapshot, expect=None):
        args = [inc, version, snapshot, key, expect.inc if expect else "", expect.version if expect else 0]
        return bool(self._call(self._put, keys=self._k(key), args=args))

    def append(self, batch):
        if not batch:
            return set()
        items = list(batch.items())

        def run():
            p = self.r.pipeline(transaction=False)
            for key, (expect, records) in items:
                self._append(keys=self._k(key)[:2], args=[expect.inc, expect.version, *records], client=p)
            return p.execute()

        return {key for (key, _), ok in zip(items, self._call(run)) if not ok}

    def delete(self, key):
        return bool(self._call(self._delete, keys=self._k(key), args=[key]))

    def count(self, tenant=None):
        if tenant is not None:
            return int(self._call(self.r.scard, f"{self.ns}:t:{tenant_name(tenant)}"))
        return int(self._call(self.r.get, f"{self.ns}:n") or 0)

    def keys(self):
        prefix = f"{self.ns}:s:"
        return [k.decode()[len(prefix):] for k in self._call(lambda: list(self.r.scan_iter(prefix + "*", count=1000)))]

    def clear(self):
        for pattern in (f"{self.ns}:*",):
            keys = self._call(lambda: list(self.r.scan_iter(pattern, count=1000)))
            for i in range(0, len(keys), 500):
                self._call(self.r.delete, *keys[i:i + 500])

    def close(self):
        try:
            self.r.close()
        except Exception:  # pragma: no cover
            pass


def new_incarnation() -> str:
    return uuid.uuid4().hex
