"""Listing a tenant's sessions, a page at a time (``SessionStore.list_sessions``).

The keys are the union of the sessions this process holds and, with snapshot/wal, those in the
store (``Backend.keys``: a Redis store lists the tenant's set, a directory store reads its
files' headers). A held session answers from memory; one held elsewhere or not at all is read
from its snapshot's header (``Backend.snapshot_meta``, no tensors) with the store's head for its
version: tier ``disk``, examples_seen and prequential as of that snapshot. Runs under the
store's lock, as every management call does.
"""

from __future__ import annotations

from typing import Optional

from server.errors import DomainError
from server.keys import split_key
from server.sessions import codec
from server.sessions.backends import Head
from server.sessions.session import Held, Session, SessionInfo


def list_sessions(store, tenant: Optional[str], after: Optional[str], limit: int, rule: Optional[str],
                  tier: Optional[str]) -> tuple[list[SessionInfo], bool]:
    held = {k: h for k, h in store.held.items() if h.session.tenant == tenant and h.tier != "none"}
    keys = set(held)
    if store.persistent:
        keys.update(store._store_call(store.backend.keys, tenant))
    todo = [k for sid, k in sorted((split_key(k)[1], k) for k in keys) if after is None or sid > after]
    page: list[SessionInfo] = []
    while todo and len(page) <= limit:  # one page and one more, to know whether more follow
        chunk, todo = todo[:limit + 1], todo[limit + 1:]
        for info in _infos(store, chunk, held):
            if (rule is None or info.rule == rule) and (tier is None or info.tier == tier):
                page.append(info)
    return page[:limit], len(page) > limit


def _infos(store, keys: list[str], held: dict[str, Held]) -> list[SessionInfo]:
    """Infos of these keys in order (keys gone meanwhile are left out)."""
    heads = store._store_call(store.backend.heads, keys) if store.persistent else {}

    def current(k: str) -> bool:
        if k not in held:
            return False
        head = heads.get(k)
        return not store.check_heads or head is None or head == Head(held[k].session.inc, held[k].synced)

    cold = [k for k in keys if not current(k)]
    metas = store._store_call(store.backend.snapshot_meta, cold) if cold else {}
    out = []
    for k in keys:
        if k not in cold:
            out.append(held[k].session.info(held[k].tier))
            continue
        head, raw = heads.get(k), metas.get(k)
        if head is None or raw is None:
            continue
        try:
            sess = Session.from_meta(k, codec.read_meta(raw), store.C)
        except (DomainError, codec.CodecError):
            continue  # an unreadable snapshot: loading it reports the error; a listing skips it
        sess.version = head.version
        out.append(sess.info("disk"))
    return out
