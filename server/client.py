"""A small typed client for the fwserve API (httpx; ``Client`` sync, ``AsyncClient`` async).

    from server.client import Client
    with Client("http://127.0.0.1:8000") as c:
        c.wait_ready()
        sid = c.create_session("prototype", classes=["5", "6", "7", "8", "9"]).id
        out = c.adapt(sid, images, labels)         # prequential predictions, new version
        pred = c.predict(images, session_id=sid)  # pred.version >= out.version

An instance is a numpy array (pixel values 0..255, ``[H, W]`` or ``[H, W, C]``), encoded image
bytes (PNG/JPEG), a PIL image, or a ready dict (``{"image": b64}`` / ``{"array": [...]}``).
Errors raise ``FwserveError`` with the server's status, code and message (from /v1's envelope
or /v2's plain message and its X-Fwserve-Error-Code header).

What the client does for you:
- session-scoped calls carry ``X-Session-ID`` (what session-affine routing hashes on);
- every adapt carries an ``Idempotency-Key`` (a fresh one per call, the same on its retries), so
  a retried adapt is applied once;
- with ``retries=N``, a request answered 429 or 503 is retried up to N times after the server's
  Retry-After (plus jitter, so many clients do not come back in step); a connection failure is
  retried too for reads and for adapts (their key makes that safe);
- ``infer`` speaks the Open Inference Protocol with the binary tensor extension both ways
  (``binary=False``: JSON tensors); with ``labels`` it adapts the session over the protocol.
How instances travel on /v1 is ``v1_encoding`` (``V1_ENCODINGS``): ``"json"`` (the default), or
``"binary"``, the raw tensor bytes of the /v1 binary input path (arrays as UINT8/FP32 pixels,
encoded images as BYTES) — the lean request path, with the same answers.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union
from urllib.parse import urlencode

import httpx
import numpy as np

from server.api.schemas import (
    AdaptResponse, ModelMetadata, PredictResponse, RuleList, ServerMetadata, SessionCreated, SessionInfo,
    SessionList,
)
from server.client_codec import HEADER_LENGTH, V1_ENCODINGS, _infer_response, _tensor
from server.client_history import HistoryCalls

Label = Union[int, str]


SESSION_HEADER = "X-Session-ID"
IDEMPOTENCY_HEADER = "Idempotency-Key"
RETRY_STATUSES = (429, 503)
MAX_RETRY_WAIT_S = 60.0


class FwserveError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def encode_instance(x: Any, label: Optional[Label] = None) -> dict:
    """One instance as the API's JSON (see the module docstring for accepted types)."""
    if isinstance(x, dict):
        out = dict(x)
    elif isinstance(x, (bytes, bytearray)):
        out = {"image": base64.b64encode(bytes(x)).decode()}
    elif hasattr(x, "save") and hasattr(x, "mode"):  # PIL image
        buf = io.BytesIO()
        x.save(buf, format="PNG")
        out = {"image": base64.b64encode(buf.getvalue()).decode()}
    elif hasattr(x, "tolist"):  # numpy array or tensor
        out = {"array": x.tolist()}
    elif isinstance(x, list):
        out = {"array": x}
    else:
        raise TypeError(f"cannot encode an instance of type {type(x).__name__}")
    if label is not None:
        out["label"] = label
    return out


def _labelled(instances: Sequence[Any], labels: Optional[Sequence[Label]]) -> list[dict]:
    if labels is None:
        return [encode_instance(x) for x in instances]
    if len(labels) != len(instances):
        raise ValueError(f"{len(instances)} instances but {len(labels)} labels")
    return [encode_instance(x, lab) for x, lab in zip(instances, labels)]


@dataclass
class _Call:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    json: Any = None
    content: Optional[bytes] = None
    headers: dict = field(default_factory=dict)
    ok: tuple[int, ...] = ()  # extra statuses that are not errors
    session_id: Optional[str] = None  # sent as X-Session-ID

    def __post_init__(self) -> None:
        if self.session_id is not None:
            self.headers[SESSION_HEADER] = self.session_id

    @property
    def retry_transport(self) -> bool:
        """May a connection failure be retried (nothing, or nothing twice, is applied by it)?"""
        return self.method == "GET" or IDEMPOTENCY_HEADER in self.headers


def _model(cls):
    return lambda r: cls.model_validate(r.json())


def _retry_after(r: httpx.Response) -> Optional[float]:
    ra = r.headers.get("retry-after", "")
    return float(ra) if ra.replace(".", "", 1).isdigit() else None


def _raise_for(r: httpx.Response, ok: tuple[int, ...]) -> None:
    if r.status_code < 400 or r.status_code in ok:
        return
    code, msg = r.headers.get("x-fwserve-error-code", "http_error"), r.text[:500]
    try:
        err = r.json()["error"]
        if isinstance(err, dict):  # /v1: {"error": {"code", "message"}}
            code, msg = err["code"], err["message"]
        elif isinstance(err, str):  # /v2: the protocol's {"error": "<message>"}
            msg = err
    except Exception:
        pass
    raise FwserveError(r.status_code, code, msg, _retry_after(r))


def _retry_delay(retry_after: Optional[float], attempt: int) -> float:
    """Seconds before retry number attempt + 1: the server's Retry-After (else exponential
    back-off from 0.1 s), plus up to a quarter more (and 0.1 s) of jitter."""
    base = retry_after if retry_after is not None else 0.1 * 2 ** attempt
    base = min(base, MAX_RETRY_WAIT_S)
    return base + random.uniform(0, 0.1 + 0.25 * base)


class _Calls:
    """Request builders shared by the sync and async clients."""

    @staticmethod
    def create_session(rule, classes, hyperparameters, session_id, init, guard=None) -> _Call:
        body: dict[str, Any] = {"rule": rule, "hyperparameters": dict(hyperparameters or {}), "init": init}
        if classes is not None:
            body["classes"] = list(classes)
        if session_id is not None:
            body["id"] = session_id
        if guard is not None:
            body["guard"] = dict(guard)
        return _Call("POST", "/v1/sessions", _model(SessionCreated), json=body, session_id=session_id)

    @staticmethod
    def predict(encode, instances, session_id, top_k, version=None) -> _Call:
        body = {"instances": _labelled(instances, None), "top_k": top_k}
        if session_id is not None:
            body["session_id"] = session_id
        if version is not None:
            body["version"] = version
        return _Call("POST", "/v1/predict", _model(PredictResponse), session_id=session_id,
                     **_merge(encode("/v1/predict", body)))

    @staticmethod
    def predict_episodic(encode, instances, support, labels, rule, hyperparameters, classes, steps, top_k) -> _Call:
        body = {"instances": _labelled(instances, None), "support": _labelled(support, labels), "rule": rule,
                "hyperparameters": dict(hyperparameters or {}), "steps": steps, "top_k": top_k}
        if classes is not None:
            body["classes"] = list(classes)
        return _Call("POST", "/v1/predict", _model(PredictResponse), **_merge(encode("/v1/predict", body)))

    @staticmethod
    def adapt(encode, session_id, instances, labels, idempotency_key) -> _Call:
        body = {"session_id": session_id, "instances": _labelled(instances, labels)}
        kw = _merge(encode("/v1/adapt", body))
        kw["headers"][IDEMPOTENCY_HEADER] = idempotency_key or uuid.uuid4().hex
        return _Call("POST", "/v1/adapt", _model(AdaptResponse), session_id=session_id, **kw)

    @staticmethod
    def infer(model, batch, session_id, top_k, datatype, labels, binary, idempotency_key,
              session_version=None) -> _Call:
        params: dict[str, Any] = {}
        if top_k != 1:
            params["top_k"] = top_k
        if session_id is not None:
            params["session_id"] = session_id
        if session_version is not None:
            params["session_version"] = session_version
        if binary:
            params["binary_data_output"] = True
        entries, blobs = [], []
        for name, values, dt in (("image", batch, datatype), ("label", labels, None)):
            if values is None:
                continue
            if name == "label":
                values = list(values)
                if all(isinstance(v, int) for v in values):
                    values = np.asarray(values, dtype="int64")
            entry, raw = _tensor(name, values, dt, binary)
            entries.append(entry)
            if raw is not None:
                blobs.append(raw)
        head = json.dumps({"inputs": entries, **({"parameters": params} if params else {})}).encode()
        headers: dict[str, str] = {}
        if labels is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key or uuid.uuid4().hex
        if blobs:
            headers.update({HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"})
        else:
            headers["content-type"] = "application/json"
        return _Call("POST", f"/v2/models/{model}/infer", _infer_response, content=head + b"".join(blobs),
                     headers=headers, session_id=session_id)


def _merge(kw: dict) -> dict:
    """An encoder's request arguments, with a headers dict to add to."""
    return {**kw, "headers": dict(kw.get("headers") or {})}


class _Api(HistoryCalls):
    """Method signatures shared by both clients; ``_do`` runs a call (sync or async)."""

    v1_encoding = "json"

    def _do(self, call: _Call):  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def _encode(self):
        return V1_ENCODINGS[self.v1_encoding]

    def create_session(self, rule: str, classes: Optional[Sequence[str]] = None,
                       hyperparameters: Optional[dict] = None, session_id: Optional[str] = None,
                       init: str = "zeros", guard: Optional[dict] = None):
        """-> SessionCreated {id, version}; `guard`: e.g. {"action": "rollback"}"""
        return self._do(_Calls.create_session(rule, classes, hyperparameters, session_id, init, guard))

    def rules(self):
        """-> RuleList {rules}: every rule, its hyper-parameters, and whether this server can use it"""
        return self._do(_Call("GET", "/v1/rules", _model(RuleList)))

    def get_session(self, session_id: str):
        """-> SessionInfo"""
        return self._do(_Call("GET", f"/v1/sessions/{session_id}", _model(SessionInfo), session_id=session_id))

    def list_sessions(self, limit: int = 100, cursor: Optional[str] = None, rule: Optional[str] = None,
                      tier: Optional[str] = None):
        """-> SessionList {sessions, next_cursor}: one page of the caller's sessions, in id order."""
        q = urlencode({k: v for k, v in (("limit", limit), ("cursor", cursor), ("rule", rule), ("tier", tier))
                       if v is not None})
        return self._do(_Call("GET", f"/v1/sessions?{q}", _model(SessionList)))

    def reset_session(self, session_id: str):
        """-> SessionCreated {id, version}: the initial state as a new version"""
        return self._do(_Call("POST", f"/v1/sessions/{session_id}/reset", _model(SessionCreated),
                              session_id=session_id))

    def _session_call(self, method: str, sid: str, path: str, parse, body=None, key: Any = False) -> Any:
        """A session route's call (server/client_history.py); `key` not False: with an Idempotency-Key."""
        headers = {} if key is False else {IDEMPOTENCY_HEADER: key or uuid.uuid4().hex}
        return self._do(_Call(method, f"/v1/sessions/{sid}{path}", parse, json=body, session_id=sid, headers=headers))

    def delete_session(self, session_id: str):
        return self._do(_Call("DELETE", f"/v1/sessions/{session_id}", lambda r: None, session_id=session_id))

    def export_session(self, session_id: str):
        """-> bytes (safetensors with metadata)"""
        return self._do(_Call("GET", f"/v1/sessions/{session_id}/export", lambda r: r.content,
                              session_id=session_id))

    def import_session(self, session_id: str, data: bytes):
        """-> SessionInfo (creates or replaces the session)"""
        return self._do(_Call("PUT", f"/v1/sessions/{session_id}/import", _model(SessionInfo), content=data,
                              headers={"content-type": "application/octet-stream"}, session_id=session_id))

    def predict(self, instances: Sequence[Any], session_id: Optional[str] = None, top_k: int = 1,
                version: Optional[int] = None):
        """-> PredictResponse; without a session the base head answers; `version`: a retained one"""
        return self._do(_Calls.predict(self._encode, instances, session_id, top_k, version))

    def predict_episodic(self, instances: Sequence[Any], support: Sequence[Any],
                         labels: Optional[Sequence[Label]] = None, rule: str = "prototype",
                         hyperparameters: Optional[dict] = None, classes: Optional[Sequence[str]] = None,
                         steps: int = 1, top_k: int = 1):
        """-> PredictResponse from a throw-away head adapted on `support` (labels given separately
        or inside dict instances)."""
        return self._do(_Calls.predict_episodic(self._encode, instances, support, labels, rule, hyperparameters,
                                                classes, steps, top_k))

    def adapt(self, session_id: str, instances: Sequence[Any], labels: Optional[Sequence[Label]] = None,
              idempotency_key: Optional[str] = None):
        """-> AdaptResponse (new version, pre-update predictions). Sent with an Idempotency-Key
        (`idempotency_key`, else a fresh one), the same on every retry of this call."""
        return self._do(_Calls.adapt(self._encode, session_id, instances, labels, idempotency_key))

    def live(self) -> Any:
        return self._do(_Call("GET", "/v2/health/live", lambda r: r.status_code == 200, ok=(503,)))

    def ready(self) -> Any:
        """-> bool"""
        return self._do(_Call("GET", "/v2/health/ready", lambda r: r.status_code == 200, ok=(503,)))

    def server_metadata(self):
        return self._do(_Call("GET", "/v2", _model(ServerMetadata)))

    def model_metadata(self, model: str):
        return self._do(_Call("GET", f"/v2/models/{model}", _model(ModelMetadata)))

    def model_ready(self, model: str):
        return self._do(_Call("GET", f"/v2/models/{model}/ready", lambda r: r.status_code == 200, ok=(503,)))

    def model_config(self, model: str) -> Any:
        """-> the model configuration (a dict in model_config.proto's field names)"""
        return self._do(_Call("GET", f"/v2/models/{model}/config", lambda r: r.json()))

    def infer(self, model: str, batch: Any, session_id: Optional[str] = None, top_k: int = 1,
              datatype: str = "FP32", labels: Optional[Sequence[Label]] = None, binary: bool = True,
              idempotency_key: Optional[str] = None, session_version: Optional[int] = None):
        """Open Inference Protocol infer -> InferResponse (every output's data filled in).
        `batch`: pixel values [B, H, W] / [B, H, W, C] (sent as `datatype`), or a list of encoded
        images (BYTES). With `labels` (names or indices, one per image) the session adapts:
        the outputs are its pre-update predictions, parameters.session_version its new version.
        `binary`: the binary tensor extension both ways (False: JSON tensors). `session_version`: a retained one."""
        return self._do(_Calls.infer(model, batch, session_id, top_k, datatype, labels, binary, idempotency_key,
                                     session_version))

    def metrics(self):
        """-> the Prometheus text exposition"""
        return self._do(_Call("GET", "/metrics", lambda r: r.text))


def _check_encoding(name: str) -> str:
    if name not in V1_ENCODINGS:
        raise ValueError(f"unknown v1_encoding {name!r}; one of {', '.join(V1_ENCODINGS)}")
    return name


def _next_delay(call: _Call, attempt: int, retries: int, r: Optional[httpx.Response]) -> Optional[float]:
    """Seconds to wait before retrying (r None: the connection failed), or None to stop."""
    if attempt >= retries:
        return None
    if r is None:
        return _retry_delay(None, attempt) if call.retry_transport else None
    if r.status_code not in RETRY_STATUSES or r.status_code in call.ok:
        return None
    return _retry_delay(_retry_after(r), attempt)


class Client(_Api):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0, retries: int = 0,
                 v1_encoding: str = "json", **httpx_kwargs) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout, **httpx_kwargs)
        self.retries = retries
        self.v1_encoding = _check_encoding(v1_encoding)

    def _do(self, call: _Call):
        attempt = 0
        while True:
            try:
                r = self.http.request(call.method, call.path, json=call.json, content=call.content,
                                      headers=call.headers)
            except httpx.TransportError:
                delay = _next_delay(call, attempt, self.retries, None)
                if delay is None:
                    raise
            else:
                delay = _next_delay(call, attempt, self.retries, r)
                if delay is None:
                    break
            time.sleep(delay)
            attempt += 1
        _raise_for(r, call.ok)
        return call.parse(r)

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.ready():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout} s")
            time.sleep(interval)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Api):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0, retries: int = 0,
                 v1_encoding: str = "json", **httpx_kwargs) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, **httpx_kwargs)
        self.retries = retries
        self.v1_encoding = _check_encoding(v1_encoding)

    async def _do(self, call: _Call):
        import asyncio

        attempt = 0
        while True:
            try:
                r = await self.http.request(call.method, call.path, json=call.json, content=call.content,
                                            headers=call.headers)
            except httpx.TransportError:
                delay = _next_delay(call, attempt, self.retries, None)
                if delay is None:
                    raise
            else:
                delay = _next_delay(call, attempt, self.retries, r)
                if delay is None:
                    break
            await asyncio.sleep(delay)
            attempt += 1
        _raise_for(r, call.ok)
        return call.parse(r)

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.1) -> None:
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.ready():
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout} s")
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
