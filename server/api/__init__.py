"""The HTTP API: FastAPI app (app.py), /v1 and /v2 routes, schemas, auth and tenants, the
request guard, decoding of instances into tensors, and the one table from errors to HTTP
responses. Runs no model code and touches no session state: it talks to the engine only."""

from server.api.app import create_app

__all__ = ["create_app"]
