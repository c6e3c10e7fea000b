"""The hot routes, served straight from the Guard middleware (server/api/middleware.py).

POST /v1/predict and POST /v1/adapt are most of a busy server's requests, and one image costs
the route little; in front of it the framework's router tries every route in turn, solves the
route's dependencies and runs two more exception-handling layers, which on this path cost about
as much as the route's own work. Guard (which has already authenticated the caller and read the
body) hands these two straight to their route functions instead.

Behaviour is the framework route's: the same function answers (v1.py registers it here and with
the framework, which keeps it in the OpenAPI document), the same principal and readiness check
runs first, the same header constraints are checked with the same 422 message, and errors are
rendered by the app's own exception-handling function (``render``). Other methods on these paths,
and every other route, go through the framework as before.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Optional

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

Handler = Callable[[Request], Awaitable[Response]]


class HotRoute:
    """One hot route: its path (the request metric's route label) and its function."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path, self.handler = path, handler


class HotRoutes:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], HotRoute] = {}  # (method, path) -> route
        self.render: Optional[Callable[[Request, Exception], Response]] = None  # set by the app

    def add(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = HotRoute(path, handler)

    def find(self, scope) -> Optional[HotRoute]:
        return self.routes.get((scope["method"], scope["path"])) if self.render is not None else None

    async def serve(self, route: HotRoute, scope, receive, send) -> None:
        scope["route"] = route
        request = Request(scope, receive)
        try:
            response = await route.handler(request)
        except Exception as e:  # what the framework's exception handlers would have answered
            response = self.render(request, e)
        await response(scope, receive, send)


def header(request: Request, name: str, check: TypeAdapter) -> Optional[str]:
    """A header parameter as the framework checks a declared one: None when absent, else the value
    if `check` accepts it, else the framework's 422 (``header.<name>: <what is wrong>``)."""
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        return check.validate_python(value)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("header", name)} for err in e.errors(include_url=False)]) \
            from None
