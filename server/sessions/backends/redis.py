"""``RedisBackend`` (``redis://host:port/db``), shared by replicas.

Keys (``{ns}`` is the namespace, ``{t}`` the tenant's storage name)::

    {ns}:{{t}}:s:<id>   hash   inc, ver, snap, snap_ver, t       the session's head, snapshot, last use;
                               log_from: the list holds versions log_from+1 .. ver (absent: snap_ver)
    {ns}:{{t}}:w:<id>   list   log records (retained history, then those after the snapshot)
    {ns}:{{t}}:h:<id>   hash   version -> archived snapshot (history anchors)
    {ns}:{{t}}:t        set    the tenant's session ids (its quota)
    {ns}:n              string sessions in the store (the global limit, kept outside the scripts)

Every write is one Lua script over one tenant's keys, which share a hash slot (the ``{t}`` hash
tag), so it is atomic, compare-and-set on the head, and runs on Redis Cluster. Versions travel
as decimal strings and are compared as strings: Lua's numbers are doubles and would round large
versions. A replica checks the heads of a micro-batch's sessions with one pipelined ``HMGET``
round trip before serving them. Durability of an acknowledged write is Redis's: run it with
``appendonly yes`` and ``appendfsync always`` (the reply to a write comes after its AOF fsync),
and with ``maxmemory-policy noeviction`` so a full Redis refuses writes instead of dropping
sessions.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from server.keys import make_key, split_key, tenant_name
from server.sessions import codec
from server.sessions.backends.base import Backend, Head, Stored, StoreError

log = logging.getLogger("fwserve.store")

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
local mt = tonumber(ARGV[4])
if mt > 0 and redis.call('SCARD', KEYS[3]) >= mt then return 'tenant_quota' end
redis.call('HSET', KEYS[1], 'inc', ARGV[1], 'ver', '0', 'snap', ARGV[2], 'snap_ver', '0', 't', ARGV[5],
           'log_from', '0')
redis.call('DEL', KEYS[2], KEYS[4])
redis.call('SADD', KEYS[3], ARGV[3])
return 'ok'
"""

# ARGV: inc, ver, snap, id, expect_inc ('' = unconditional, '-' = only if absent), expect_ver, time,
# keep_from ('' = drop the log up to ver and every archive)
_PUT = """
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver', 'snap_ver', 'log_from')
if ARGV[5] == '-' then
  if h[1] then return 0 end
elseif ARGV[5] ~= '' then
  if h[1] ~= ARGV[5] or h[2] ~= ARGV[6] then return 0 end
end
local v = tonumber(ARGV[2])
local ver = ARGV[2]
local log_from = v
if h[1] == ARGV[1] then
  local lf = tonumber(h[4] or h[3])
  local keep = v
  if ARGV[8] ~= '' then
    keep = tonumber(ARGV[8])
    if h[3] ~= ARGV[2] and tonumber(h[3]) >= keep then
      redis.call('HSET', KEYS[4], h[3], redis.call('HGET', KEYS[1], 'snap'))
    end
    for _, a in ipairs(redis.call('HKEYS', KEYS[4])) do
      if tonumber(a) < keep then redis.call('HDEL', KEYS[4], a) end
    end
  else
    redis.call('DEL', KEYS[4])
  end
  local drop = keep - lf
  if drop > 0 then
    redis.call('LTRIM', KEYS[2], drop, -1)
    lf = keep
  end
  if tonumber(h[2]) > v then ver = h[2] end
  if redis.call('LLEN', KEYS[2]) == 0 then lf = tonumber(ver) end
  log_from = lf
else
  redis.call('DEL', KEYS[2], KEYS[4])
end
redis.call('HSET', KEYS[1], 'inc', ARGV[1], 'ver', ver, 'snap', ARGV[3], 'snap_ver', ARGV[2], 't', ARGV[7],
           'log_from', string.format('%d', log_from))
if not h[1] then
  redis.call('SADD', KEYS[3], ARGV[4])
  return 2
end
return 1
"""

# ARGV: inc, expected ver, new ver, time, records...
_APPEND = """
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return 0 end
for i = 5, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HSET', KEYS[1], 'ver', ARGV[3], 't', ARGV[4])
return 1
"""

_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 't', ARGV[1]) end
return 0
"""

# the snapshot's safetensors header only (8-byte length + JSON), read inside Redis
_HEAD = """
local s = redis.call('HGET', KEYS[1], 'snap')
if not s then return false end
local b1, b2, b3, b4 = string.byte(s, 1, 4)
local n = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
return string.sub(s, 1, 8 + n)
"""

_DELETE = """
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[2], KEYS[4])
  redis.call('SREM', KEYS[3], ARGV[1])
  return 1
end
return 0
"""


def redact(url: str) -> str:
    """The URL without its password (for logs and health output)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def parse_version(raw) -> int:
    """A stored version as an int; anything that is not a plain non-negative integer is an error."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if not text.isdigit():
        raise StoreError(f"corrupt version {text[:32]!r} in the store")
    return int(text)


class RedisBackend(Backend):
    shared = True

    def __init__(self, url: str, namespace: str = "fwserve") -> None:
        try:
            import redis
        except ImportError:  # pragma: no cover - an install without the redis extra
            raise StoreError("a redis:// store needs the redis package (pip install 'fwserve[redis]')") from None
        self._redis_errors = (redis.RedisError, OSError)
        self.url = redact(url)
        self.ns = namespace
        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        try:
            self.r.ping()
        except self._redis_errors as e:
            raise StoreError(f"cannot reach redis at {self.url}: {type(e).__name__}") from None
        self._create = self.r.register_script(_CREATE)
        self._put = self.r.register_script(_PUT)
        self._append = self.r.register_script(_APPEND)
        self._delete = self.r.register_script(_DELETE)
        self._touch = self.r.register_script(_TOUCH)
        self._head = self.r.register_script(_HEAD)
        self._migrate_legacy()

    def durability_warning(self) -> Optional[str]:
        try:
            aof = self.r.config_get("appendonly").get("appendonly")
            fs = self.r.config_get("appendfsync").get("appendfsync")
            policy = self.r.config_get("maxmemory-policy").get("maxmemory-policy")
        except self._redis_errors:
            return None  # CONFIG may be disabled (managed Redis): nothing to check
        problems = []
        if aof != "yes" or fs != "always":
            problems.append(f"appendonly={aof} appendfsync={fs}: an acknowledged adapt can be lost if redis "
                            "crashes (use appendonly yes + appendfsync always)")
        if policy not in (None, "noeviction"):
            problems.append(f"maxmemory-policy={policy}: a full redis may evict sessions silently "
                            "(use noeviction)")
        return f"redis at {self.url}: " + "; ".join(problems) if problems else None

    def _k(self, key: str) -> list[str]:
        tenant, sid = split_key(key)
        t = f"{self.ns}:{{{tenant_name(tenant)}}}"
        return [f"{t}:s:{sid}", f"{t}:w:{sid}", f"{t}:t", f"{t}:h:{sid}"]

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
            if inc is None:
                out[k] = None
                continue
            try:
                out[k] = Head(inc.decode(), parse_version(ver))
            except StoreError as e:  # this session only: the others are served
                out[k] = e
        return out

    def load(self, key):
        return self._read(key, False)

    def history(self, key):
        return self._read(key, True)

    def _read(self, key, anchors: bool):
        hk, wk, _, ak = self._k(key)

        def run():
            p = self.r.pipeline(transaction=True)
            p.hmget(hk, "inc", "ver", "snap_ver", "snap")
            p.lrange(wk, 0, -1)
            p.hgetall(ak) if anchors else p.hkeys(ak)
            return p.execute()

        (inc, ver, sv, snap), records, archived = self._call(run)
        if inc is None:
            return None
        stored = Stored(inc.decode(), parse_version(ver), parse_version(sv), snap, list(records))
        stored.archives = sorted(parse_version(a) for a in archived)
        if anchors:
            stored.anchors = {parse_version(a): bytes(b) for a, b in archived.items()}
            stored.anchors[stored.snap_version] = snap
        return stored

    def create(self, key, inc, snapshot, max_tenant=0, max_total=0):
        if max_total and self.count() >= max_total:  # the global limit: best effort (another slot)
            return "limit"
        res = self._call(self._create, keys=self._k(key),
                         args=[inc, snapshot, split_key(key)[1], max_tenant, repr(time.time())])
        res = res.decode() if isinstance(res, bytes) else str(res)
        if res == "ok":
            self._call(self.r.incr, f"{self.ns}:n")
        return res

    def put(self, key, inc, version, snapshot, expect=None, keep_from=None):
        if expect is None:
            exp_inc, exp_ver = "", ""
        elif expect == "absent":
            exp_inc, exp_ver = "-", ""
        else:
            exp_inc, exp_ver = expect.inc, str(expect.version)
        args = [inc, str(version), snapshot, split_key(key)[1], exp_inc, exp_ver, repr(time.time()),
                "" if keep_from is None else str(keep_from)]
        res = int(self._call(self._put, keys=self._k(key), args=args))
        if res == 2:
            self._call(self.r.incr, f"{self.ns}:n")
        return res > 0

    def append(self, batch):
        if not batch:
            return {}
        items = list(batch.items())

        now = repr(time.time())

        def run():
            p = self.r.pipeline(transaction=False)
            for key, (expect, records) in items:
                args = [expect.inc, str(expect.version), str(expect.version + len(records)), now, *records]
                self._append(keys=self._k(key)[:2], args=args, client=p)
            return p.execute(raise_on_error=False)

        failed = {}
        for (key, _), res in zip(items, self._call(run)):
            if isinstance(res, Exception):  # e.g. OOM under noeviction: refused, not applied
                failed[key] = f"error: redis: {type(res).__name__}: {res}"
            elif not res:
                failed[key] = "conflict"
        return failed

    def delete(self, key):
        existed = bool(self._call(self._delete, keys=self._k(key), args=[split_key(key)[1]]))
        if existed:
            self._call(self.r.decr, f"{self.ns}:n")
        return existed

    def count(self, tenant=None):
        if tenant is not None:
            return int(self._call(self.r.scard, f"{self.ns}:{{{tenant_name(tenant)}}}:t"))
        return int(self._call(self.r.get, f"{self.ns}:n") or 0)

    def touch(self, keys):
        keys = list(keys)
        if not keys:
            return
        now = repr(time.time())

        def run():
            p = self.r.pipeline(transaction=False)
            for k in keys:
                self._touch(keys=self._k(k)[:1], args=[now], client=p)
            return p.execute()

        self._call(run)

    def expire_idle(self, before, keep):
        """Walks every tenant's set (a SCAN and one pipelined read per tenant: run it rarely)."""
        gone = []
        for tkey in self._call(lambda: list(self.r.scan_iter(f"{self.ns}:{{*}}:t", count=1000))):
            tag = tkey.decode()[len(self.ns) + 2:-3]  # {ns}:{<tag>}:t
            tenant = None if tag == tenant_name(None) else tag
            ids = [i.decode() for i in self._call(self.r.smembers, tkey)]
            keys = [f"{tenant}/{i}" if tenant else i for i in ids]
            times = self._call(lambda: self._pipeline_hget([self._k(k)[0] for k in keys], "t"))
            for key, t in zip(keys, times):
                if key in keep or t is None or float(t) >= before:
                    continue
                try:
                    meta = codec.read_meta(self._call(self.r.hget, self._k(key)[0], "snap") or b"")
                    self.unclaim(tenant, [e["key"] for e in meta.get("idempotency", ())]
                                 + ([meta["create_idempotency"]["key"]] if meta.get("create_idempotency") else []))
                except codec.CodecError:
                    pass
                if self.delete(key):
                    gone.append(key)
        return gone

    def _pipeline_hget(self, hashes: list[str], field: str) -> list:
        p = self.r.pipeline(transaction=False)
        for h in hashes:
            p.hget(h, field)
        return p.execute()

    def _claim_key(self, tenant, key: str) -> str:
        return f"{self.ns}:{{{tenant_name(tenant)}}}:k:{key}"

    def claims(self, tenant, keys):
        keys = list(keys)
        if not keys:
            return {}
        values = self._call(self.r.mget, [self._claim_key(tenant, k) for k in keys])
        return {k: json.loads(v) for k, v in zip(keys, values) if v}

    def claim(self, tenant, claims):
        if not claims:
            return
        now = time.time()

        def run():  # SET NX with the claim's remaining time: Redis forgets it when it expires
            p = self.r.pipeline(transaction=False)
            for k, c in claims.items():
                p.set(self._claim_key(tenant, k), json.dumps(c), nx=True, px=max(1, int((c["expires"] - now) * 1000)))
            return p.execute()

        self._call(run)

    def unclaim(self, tenant, keys):
        keys = [self._claim_key(tenant, k) for k in keys]
        if keys:
            self._call(self.r.delete, *keys)

    def keys(self, tenant):
        ids = self._call(self.r.smembers, f"{self.ns}:{{{tenant_name(tenant)}}}:t")
        return sorted(make_key(tenant, i.decode()) for i in ids)

    def snapshot_meta(self, keys):
        keys = list(keys)
        if not keys:
            return {}

        def run():
            p = self.r.pipeline(transaction=False)
            for k in keys:
                self._head(keys=self._k(k)[:1], client=p)
            return p.execute()

        return {k: (None if h is None else bytes(h)) for k, h in zip(keys, self._call(run))}

    def close(self):
        try:
            self.r.close()
        except Exception:  # pragma: no cover
            pass

    def _migrate_legacy(self) -> None:
        """Sessions written by an earlier release (``{ns}:s:<key>``, one slot per key kind) move to
        the tenant-tagged layout once, at start; a store without them costs one SCAN."""
        prefix = f"{self.ns}:s:"
        moved = 0
        for raw in self._call(lambda: list(self.r.scan_iter(prefix + "*", count=1000))):
            key = raw.decode()[len(prefix):]
            h = self._call(self.r.hgetall, raw)
            if not h:
                continue
            records = self._call(self.r.lrange, f"{self.ns}:w:{key}", 0, -1)
            hk, wk, tk = self._k(key)[:3]

            def write():
                p = self.r.pipeline(transaction=True)
                p.delete(hk, wk)
                p.hset(hk, mapping={**{k.decode(): v for k, v in h.items()}, "t": repr(time.time())})
                if records:
                    p.rpush(wk, *records)
                p.sadd(tk, split_key(key)[1])
                p.delete(raw, f"{self.ns}:w:{key}")
                p.srem(f"{self.ns}:t:{tenant_name(split_key(key)[0])}", key)
                return p.execute()

            self._call(write)
            moved += 1
        if moved:
            log.warning("store %s: moved %d sessions to the tenant-tagged key layout", self.url, moved)


__all__ = ["RedisBackend", "parse_version", "redact"]
