"""Sessions: the one owner of all mutable state (heads, rule state, versions, statistics,
idempotency records), their tiers (device slots, host memory, the store) and their durability.

    store = SessionStore(settings, d, base_W, base_b, base_classes, device, backbone_name)
    info, replayed = store.create("sgd", ["a", "b"], {}, session_id="s1")
    with store.batch(["s1"]) as txn:     # one micro-batch (server/sessions/transaction.py)
        ...

Modules: session (Session, SessionInfo), slots (slot tensors, one pool per head width), tiers (device/host/disk moves),
codec (byte formats), wal (log buffering and replay), idempotency, transaction, store (the
facade), history (versions, retention, the in-memory ring), versions (listing, materialising,
rollback, fork, patch), guard (guard settings and the watch), references (reference heads),
backends/ (directory, redis).
"""

from server.sessions.backends import Backend, StoreError, open_backend
from server.sessions.session import Session, SessionInfo
from server.sessions.slots import width_for
from server.sessions.store import SessionStore, StoreEvents
from server.sessions.transaction import Transaction
from server.sessions.versions import UNSET, VersionHead

__all__ = ["UNSET", "Backend", "Session", "SessionInfo", "SessionStore", "StoreError", "StoreEvents", "Transaction",
           "VersionHead", "open_backend", "width_for"]
