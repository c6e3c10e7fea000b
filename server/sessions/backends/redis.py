"""``RedisBackend`` (``redis://host:port/db``), shared by replicas.

Every write is one Lua script, so it is atomic and compare-and-set on the head; a replica
checks the heads of the sessions of a micro-batch with one pipelined ``HMGET`` round trip
before serving them. Durability of an acknowledged write is Redis's: run it with
``appendonly yes`` and ``appendfsync always`` (the reply to a write comes after its AOF fsync).
"""

from __future__ import annotations

from typing import Optional

from server.keys import split_key, tenant_name
from server.sessions.backends.base import Backend, Head, Stored, StoreError


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
        self._head = self.r.register_script(_HEAD)

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

    def keys(self, tenant):
        members = self._call(self.r.smembers, f"{self.ns}:t:{tenant_name(tenant)}")
        return [k.decode() for k in members]

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
