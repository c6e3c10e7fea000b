"""Authentication and tenants: API keys, namespaces, quotas, rate limits.

Keys are configured hashed (the server never holds a key itself), one tenant per line, from
``--api-keys`` / ``FWSERVE_API_KEYS`` (lines or ``;``-separated entries) and ``--api-keys-file``::

    # tenant   sha256 of the key                        options
    acme       sha256:9f86d081884c7d659a2feaa0c55ad015...  sessions=1000 rps=50 id=acme-2024
    ops        sha256:60303ae22b998861bce3b28f33eec1be...  admin

Every key has a stable, non-secret id (``Principal.key_id``, in the access log): ``id=NAME`` on
its line, else the first 12 hex digits of its sha256. Ids are unique across keys.

Rotation: a tenant may hold several keys at once (one line each, the same tenant name): both
reach the same sessions, quotas and rate limit. Add the new key's line, move clients over, then
remove the old line and restart (or roll) the server.

``fwserve hash-key`` prints the ``sha256:...`` of a key read from stdin. A request carries its
key as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; no or an unknown key is 401.

Every session lives in its tenant's namespace (store key ``tenant/id``): a key reaches only its
own tenant's sessions, and another tenant's id answers 404, exactly like an id that does not
exist. An admin key works in its own namespace, may act in any tenant's namespace with
``X-Fwserve-Tenant: NAME``, and may list tenants (``GET /v1/admin/tenants``).

Quotas, per tenant (its line, else ``--tenant-max-sessions`` / ``--tenant-rps``): sessions
(create/import beyond it: 429 ``session_quota``) and requests per second (a token bucket of
``--tenant-burst`` tokens; beyond it: 429 ``rate_limited`` with ``Retry-After``). The rate
limit is per replica (one across a replica's API worker processes: the buckets live in shared
memory): N replicas behind a balancer admit up to N times the rate.

With no keys configured auth is off: every request is the anonymous tenant (sessions keyed by
their bare id). ``serve`` warns loudly when auth is off and it binds beyond localhost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from server.api.errors import forbidden, too_many_requests, unauthorized
from server.keys import TENANT_PATTERN, make_key

TENANT_HEADER = "x-fwserve-tenant"
_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
KEY_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "ip6-localhost"}


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str  # hex digest
    admin: bool = False
    max_sessions: Optional[int] = None
    rps: Optional[float] = None
    id: str = ""  # the key's id: its id= option, else key_id_of(key_sha256)


def key_id_of(key_sha256: str) -> str:
    """The default id of a key: the first 12 hex digits of its sha256 (not enough to find the key)."""
    return key_sha256[:12]


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: its tenant (None: auth off), whether the key is an admin's, and the
    key's id (None: auth off)."""

    tenant: Optional[str]
    admin: bool = False
    max_sessions: int = 0  # 0: no per-tenant quota
    key_id: Optional[str] = None

    def key(self, session_id: Optional[str]) -> Optional[str]:
        return None if session_id is None else make_key(self.tenant, session_id)


def parse_keys(text: str, source: str = "api keys") -> list[Tenant]:
    out = []
    for n, raw in enumerate(re.split(r"[;\n]", text), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(f"{source}, entry {n}: expected 'TENANT sha256:HEX [admin] [sessions=N] [rps=R] "
                             "[id=NAME]'")
        name, digest, opts = parts[0], parts[1], parts[2:]
        if not re.match(TENANT_PATTERN, name):
            raise ValueError(f"{source}, entry {n}: tenant name {name!r} must match {TENANT_PATTERN}")
        m = _HASH.match(digest.lower())
        if not m:
            raise ValueError(f"{source}, entry {n}: the key must be given hashed as sha256:<64 hex digits> "
                             "(fwserve hash-key prints it)")
        admin, sessions, rps, key_id = False, None, None, key_id_of(m.group(1))
        for o in opts:
            k, _, v = o.partition("=")
            try:
                if o == "admin":
                    admin = True
                elif k == "sessions":
                    sessions = int(v)
                    assert sessions >= 0
                elif k == "rps":
                    rps = float(v)
                    assert math.isfinite(rps) and rps >= 0
                elif k == "id":
                    assert re.match(KEY_ID_PATTERN, v)
                    key_id = v
                else:
                    raise ValueError
            except (ValueError, AssertionError):
                raise ValueError(f"{source}, entry {n}: unknown or invalid option {o!r}") from None
        out.append(Tenant(name, m.group(1), admin, sessions, rps, key_id))
    return out


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.t = burst, time.monotonic()

    def take(self) -> float:
        """0 when a request may go now, else the seconds until it may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Auth:
    def __init__(self, settings) -> None:
        tenants = []
        if settings.api_keys:
            tenants += parse_keys(settings.api_keys, "--api-keys")
        if settings.api_keys_file is not None:
            path = Path(settings.api_keys_file)
            try:
                text = path.read_text()
            except OSError as e:
                raise ValueError(f"--api-keys-file {path}: {e}") from None
            tenants += parse_keys(text, str(path))
        self.by_hash: dict[str, Tenant] = {}
        self.by_name: dict[str, Tenant] = {}
        ids: dict[str, Tenant] = {}
        for t in tenants:
            if t.key_sha256 in self.by_hash:
                raise ValueError(f"api keys: the same key is given for {self.by_hash[t.key_sha256].name!r} and {t.name!r}")
            if t.id in ids:
                raise ValueError(f"api keys: key id {t.id!r} is given to two keys (of {ids[t.id].name!r} and "
                                 f"{t.name!r}); key ids must be unique")
            ids[t.id] = t
            self.by_hash[t.key_sha256] = t
            first = self.by_name.setdefault(t.name, t)
            for attr in ("max_sessions", "rps"):  # a tenant's quotas, from whichever of its lines gives them
                mine, theirs = getattr(first, attr), getattr(t, attr)
                if mine is not None and theirs is not None and mine != theirs:
                    raise ValueError(f"api keys: the keys of tenant {t.name!r} give it different {attr}; give "
                                     "quotas on one of its lines (or the same on each)")
                if mine is None and theirs is not None:
                    first = self.by_name[t.name] = dataclasses.replace(first, **{attr: theirs})
        self.enabled = bool(tenants)
        self.default_sessions = settings.tenant_max_sessions
        self.default_rps = settings.tenant_rps
        self.burst = settings.tenant_burst
        self._buckets: dict[Optional[str], TokenBucket] = {}
        self.shared: Optional[SharedBuckets] = None  # API worker processes: the buckets they share
        self._lock = threading.Lock()

    def tenants(self) -> list[str]:
        return sorted(self.by_name)

    def quota(self, tenant: Optional[str]) -> int:
        t = self.by_name.get(tenant) if tenant else None
        return t.max_sessions if t is not None and t.max_sessions is not None else self.default_sessions

    def rps(self, tenant: Optional[str]) -> float:
        t = self.by_name.get(tenant) if tenant else None
        return t.rps if t is not None and t.rps is not None else self.default_rps

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The request's principal (401/403 otherwise), after its tenant's rate limit (429)."""
        if not self.enabled:
            p = Principal(None, admin=False, max_sessions=self.default_sessions)
        else:
            key = headers.get("x-api-key")
            auth = headers.get("authorization", "")
            if key is None and auth[:7].lower() == "bearer ":
                key = auth[7:].strip()
            t = self.by_hash.get(hashlib.sha256(key.encode()).hexdigest()) if key else None
            if t is None:
                raise unauthorized()
            tenant = t.name
            other = headers.get(TENANT_HEADER)
            if other is not None and other != t.name:
                if not t.admin:
                    raise forbidden(f"only an admin key may act for another tenant ({TENANT_HEADER})")
                if not re.match(TENANT_PATTERN, other):
                    raise forbidden(f"{TENANT_HEADER} must match {TENANT_PATTERN}")
                tenant = other
            p = Principal(tenant, admin=t.admin, max_sessions=self.quota(tenant), key_id=t.id)
        self._limit(p.tenant if not self.enabled else t.name)  # the caller's rate, even acting for another
        return p

    def _limit(self, tenant: Optional[str]) -> None:
        rate = self.rps(tenant)
        if rate <= 0:
            return
        burst = self.burst or max(1.0, rate)
        if self.shared is not None:
            wait = self.shared.take(tenant, rate, burst)
        else:
            with self._lock:
                b = self._buckets.get(tenant)
                if b is None:
                    b = self._buckets[tenant] = TokenBucket(rate, burst)
                wait = b.take()
        if wait > 0:
            raise too_many_requests("rate_limited", f"tenant {tenant or 'anonymous'!s} is over {rate:g} requests "
                                    "per second", wait)


class SharedBuckets:
    """Every tenant's token bucket in shared memory, for API worker processes: a tenant's rate is
    one across the workers, not one per worker. Made by the supervising process and handed to
    the workers when they are started (its shared array and lock travel with it)."""

    def __init__(self, ctx, settings) -> None:
        self.names = [None, *Auth(settings).tenants()]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.state = ctx.Array("d", [v for _ in self.names for v in (-1.0, 0.0)])  # tokens (-1: full), time

    def take(self, tenant: Optional[str], rate: float, burst: float) -> float:
        """0 when a request of `tenant` may go now, else the seconds until it may."""
        i = 2 * self.index.get(tenant, 0)
        with self.state.get_lock():
            now = time.monotonic()
            tokens = burst if self.state[i] < 0 else min(burst, self.state[i] + (now - self.state[i + 1]) * rate)
            self.state[i + 1] = now
            if tokens >= 1:
                self.state[i] = tokens - 1
                return 0.0
            self.state[i] = tokens
            return (1 - tokens) / rate

    def __getstate__(self):
        return {"names": self.names, "state": self.state}

    def __setstate__(self, d) -> None:
        self.names, self.state = d["names"], d["state"]
        self.index = {n: i for i, n in enumerate(self.names)}


def auth_warning(settings, auth: Optional[Auth] = None) -> Optional[str]:
    """The loud warning for auth off on a non-loopback interface, or None."""
    auth = auth or Auth(settings)
    if auth.enabled or settings.host in LOOPBACK:
        return None
    bar = "!" * 78
    return (f"{bar}\n!! fwserve: AUTH IS OFF and the server binds {settings.host}:{settings.port}.\n"
            "!! Anyone who can reach this port can read, change and delete every session.\n"
            "!! Configure API keys (--api-keys-file / FWSERVE_API_KEYS; `fwserve hash-key`) or bind 127.0.0.1.\n"
            f"{bar}")
