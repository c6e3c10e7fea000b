"""Store backends behind one interface (base.Backend): a directory (one process) or Redis (shared)."""

from server.sessions.backends.base import Backend, Head, Stored, StoreError, new_incarnation
from server.sessions.backends.directory import DirectoryBackend
from server.sessions.backends.redis import RedisBackend


def open_backend(url: str, *, fsync: bool = True, exclusive: bool = True, namespace: str = "fwserve",
                 max_bytes: int = 0) -> Backend:
    """The backend for a --store value: redis://, rediss://, unix:// or a directory (file:// optional)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBackend(url, namespace=namespace)
    from pathlib import Path

    if url.startswith("file://"):
        url = url[len("file://"):]
    return DirectoryBackend(Path(url), fsync=fsync, exclusive=exclusive, max_bytes=max_bytes)


__all__ = ["Backend", "DirectoryBackend", "Head", "RedisBackend", "StoreError", "Stored", "new_incarnation",
           "open_backend"]
