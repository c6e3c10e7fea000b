"""The hot routes, served straight from the Guard middleware (server/api/middleware.py).

POST /v1/predict, POST /v1/adapt and POST /v2/models/{name}[/versions/{version}]/infer (the Open
Inference Protocol's) are most of a busy server's requests, and one image costs the route
little; in front of it the framework's router tries every route in turn, solves the route's
dependencies and runs two more exception-handling layers, which on this path cost about as much
as the route's own work. Guard (which has already authenticated the caller and read the body)
hands these requests straight to their route functions instead.

Behaviour is the framework route's: the same function answers (v1.py and v2/routes.py register it
here and with the framework, which keeps it in the OpenAPI document), the same dependencies run in
the same order (the model check, then the principal and readiness), the same header constraints
are checked with the same 422 message, path parameters match as the framework's do (one path
segment each), and errors are rendered by the app's own exception-handling function
(``render``). Other methods on these paths, and every other route, go through the framework as
before.
"""

from __future__ import annotations

import re
from typing import Annotated, Awaitable, Callable, Optional

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import StringConstraints, TypeAdapter, ValidationError

Handler = Callable[[Request], Awaitable[Response]]
IDEMPOTENCY_KEY = "Idempotency-Key"
IDEMPOTENCY_LIMITS = {"min_length": 1, "max_length": 255, "pattern": r"^[\x21-\x7e]+$"}  # what the routes declare
IDEMPOTENCY_CHECK = TypeAdapter(Annotated[str, StringConstraints(**IDEMPOTENCY_LIMITS)])
_PARAM = re.compile(r"\{(\w+)\}")


class HotRoute:
    """One hot route: its path (the request metric's route label) and its function."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path, self.handler = path, handler


class HotRoutes:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], HotRoute] = {}  # (method, path) -> route
        self.templates: list[tuple[str, re.Pattern, HotRoute]] = []  # paths with {parameters}
        self.render: Optional[Callable[[Request, Exception], Response]] = None  # set by the app

    def add(self, method: str, path: str, handler: Handler) -> None:
        route = HotRoute(path, handler)
        if "{" not in path:
            self.routes[(method, path)] = route
            return
        pattern = "".join(f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part)
                          for i, part in enumerate(_PARAM.split(path)))
        self.templates.append((method, re.compile(pattern + "$"), route))

    def find(self, scope) -> Optional[tuple[HotRoute, dict]]:
        """The hot route of a request and its path parameters, or None."""
        if self.render is None:
            return None
        method, path = scope["method"], scope["path"]
        route = self.routes.get((method, path))
        if route is not None:
            return route, {}
        for m, pattern, route in self.templates:
            match = pattern.match(path) if m == method else None
            if match:
                return route, match.groupdict()
        return None

    async def serve(self, found: tuple[HotRoute, dict], scope, receive, send) -> None:
        route, params = found
        scope["route"], scope["path_params"] = route, params
        request = Request(scope, receive)
        try:
            response = await route.handler(request)
        except Exception as e:  # what the framework's exception handlers would have answered
            response = self.render(request, e)
        await response(scope, receive, send)


def valid_idempotency_key(value: str) -> bool:
    """Whether a key meets the constraints the routes declare (gRPC metadata is checked with it too)."""
    try:
        IDEMPOTENCY_CHECK.validate_python(value)
    except ValidationError:
        return False
    return True


def header_param(request: Request, name: str, check: TypeAdapter) -> Optional[str]:
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
