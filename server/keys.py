"""Session keys: how a client's session id and its tenant make one key.

A session's key is its id, or ``tenant/id`` when API keys are on. The API builds keys from the
caller's tenant and the id in the request; the sessions package stores and splits them.
"""

from __future__ import annotations

from typing import Optional

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
TENANT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
NO_TENANT = "_"  # storage name of sessions created while auth is off


def make_key(tenant: Optional[str], session_id: str) -> str:
    return f"{tenant}/{session_id}" if tenant else session_id


def split_key(key: str) -> tuple[Optional[str], str]:
    """'tenant/id' -> (tenant, id); 'id' -> (None, id)."""
    tenant, sep, sid = key.rpartition("/")
    return (tenant if sep else None), sid


def tenant_name(tenant: Optional[str]) -> str:
    return tenant or NO_TENANT
