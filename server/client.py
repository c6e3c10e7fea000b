"""A small typed client for the fwserve API (httpx; ``Client`` sync, ``AsyncClient`` async).

    from server.client import Client
    with Client("http://127.0.0.1:8000") as c:
        c.wait_ready()
        sid = c.create_session("prototype", classes=["5", "6", "7", "8", "9"]).id
        out = c.adapt(sid, images, labels)         # prequential predictions, new version
        pred = c.predict(images, session_id=sid)  # pred.version >= out.version

An instance is a numpy array (pixel values 0..255, ``[H, W]`` or ``[H, W, C]``), encoded image
bytes (PNG/JPEG), a PIL image, or a ready dict (``{"image": b64}`` / ``{"array": [...]}``).
Errors raise ``FwserveError`` with the server's status, code and message. With ``retries=N``
a request answered 503 (queue full, not ready) is retried up to N times after its Retry-After.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import httpx

from server.api.schemas import (
    AdaptResponse, InferResponse, ModelMetadata, PredictResponse, ServerMetadata, SessionCreated, SessionInfo,
)

Label = Union[int, str]


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
    headers: Optional[dict] = None
    ok: tuple[int, ...] = ()  # extra statuses that are not errors


def _model(cls):
    return lambda r: cls.model_validate(r.json())


def _raise_for(r: httpx.Response, ok: tuple[int, ...]) -> None:
    if r.status_code < 400 or r.status_code in ok:
        return
    try:
        err = r.json()["error"]
        code, msg = err["code"], err["message"]
    except Exception:
        code, msg = "http_error", r.text[:500]
    ra = r.headers.get("retry-after")
    raise FwserveError(r.status_code, code, msg, float(ra) if ra and ra.replace(".", "", 1).isdigit() else None)


class _Calls:
    """Request builders shared by the sync and async clients."""

    @staticmethod
    def create_session(rule, classes, hyperparameters, session_id, init) -> _Call:
        body: dict[str, Any] = {"rule": rule, "hyperparameters": dict(hyperparameters or {}), "init": init}
        if classes is not None:
            body["classes"] = list(classes)
        if session_id is not None:
            body["id"] = session_id
        return _Call("POST", "/v1/sessions", _model(SessionCreated), json=body)

    @staticmethod
    def predict(instances, session_id, top_k) -> _Call:
        body = {"instances": _labelled(instances, None), "top_k": top_k}
        if session_id is not None:
            body["session_id"] = session_id
        return _Call("POST", "/v1/predict", _model(PredictResponse), json=body)

    @staticmethod
    def predict_episodic(instances, support, labels, rule, hyperparameters, classes, steps, top_k) -> _Call:
        body = {"instances": _labelled(instances, None), "support": _labelled(support, labels), "rule": rule,
                "hyperparameters": dict(hyperparameters or {}), "steps": steps, "top_k": top_k}
        if classes is not None:
            body["classes"] = list(classes)
        return _Call("POST", "/v1/predict", _model(PredictResponse), json=body)

    @staticmethod
    def adapt(session_id, instances, labels) -> _Call:
        body = {"session_id": session_id, "instances": _labelled(instances, labels)}
        return _Call("POST", "/v1/adapt", _model(AdaptResponse), json=body)

    @staticmethod
    def infer(model, batch, session_id, top_k, datatype) -> _Call:
        import numpy as np

        arr = np.asarray(batch)
        params: dict[str, Any] = {"top_k": top_k}
        if session_id is not None:
            params["session_id"] = session_id
        body = {"inputs": [{"name": "image", "shape": list(arr.shape), "datatype": datatype,
                            "data": arr.reshape(-1).tolist()}], "parameters": params}
        return _Call("POST", f"/v2/models/{model}/infer", _model(InferResponse), json=body)


class _Api:
    """Method signatures shared by both clients; ``_do`` runs a call (sync or async)."""

    def _do(self, call: _Call):  # pragma: no cover - overridden
        raise NotImplementedError

    def create_session(self, rule: str, classes: Optional[Sequence[str]] = None,
                       hyperparameters: Optional[dict] = None, session_id: Optional[str] = None,
                       init: str = "zeros"):
        """-> SessionCreated {id, version}"""
        return self._do(_Calls.create_session(rule, classes, hyperparameters, session_id, init))

    def get_session(self, session_id: str):
        """-> SessionInfo"""
        return self._do(_Call("GET", f"/v1/sessions/{session_id}", _model(SessionInfo)))

    def reset_session(self, session_id: str):
        """-> SessionCreated {id, version: 0}"""
        return self._do(_Call("POST", f"/v1/sessions/{session_id}/reset", _model(SessionCreated)))

    def delete_session(self, session_id: str):
        return self._do(_Call("DELETE", f"/v1/sessions/{session_id}", lambda r: None))

    def export_session(self, session_id: str):
        """-> bytes (safetensors with metadata)"""
        return self._do(_Call("GET", f"/v1/sessions/{session_id}/export", lambda r: r.content))

    def import_session(self, session_id: str, data: bytes):
        """-> SessionInfo (creates or replaces the session)"""
        return self._do(_Call("PUT", f"/v1/sessions/{session_id}/import", _model(SessionInfo), content=data,
                              headers={"content-type": "application/octet-stream"}))

    def predict(self, instances: Sequence[Any], session_id: Optional[str] = None, top_k: int = 1):
        """-> PredictResponse; without a session the base head answers."""
        return self._do(_Calls.predict(instances, session_id, top_k))

    def predict_episodic(self, instances: Sequence[Any], support: Sequence[Any],
                         labels: Optional[Sequence[Label]] = None, rule: str = "prototype",
                         hyperparameters: Optional[dict] = None, classes: Optional[Sequence[str]] = None,
                         steps: int = 1, top_k: int = 1):
        """-> PredictResponse from a throw-away head adapted on `support` (labels given separately
        or inside dict instances)."""
        return self._do(_Calls.predict_episodic(instances, support, labels, rule, hyperparameters, classes,
                                                steps, top_k))

    def adapt(self, session_id: str, instances: Sequence[Any], labels: Optional[Sequence[Label]] = None):
        """-> AdaptResponse (new version, pre-update predictions)."""
        return self._do(_Calls.adapt(session_id, instances, labels))

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

    def infer(self, model: str, batch: Any, session_id: Optional[str] = None, top_k: int = 1,
              datatype: str = "FP32"):
        """OIP v2 infer on a batch array [B, H, W] or [B, H, W, C] -> InferResponse."""
        return self._do(_Calls.infer(model, batch, session_id, top_k, datatype))

    def metrics(self):
        """-> the Prometheus text exposition"""
        return self._do(_Call("GET", "/metrics", lambda r: r.text))


def _retry_delay(r: httpx.Response, call: _Call, attempt: int, retries: int) -> Optional[float]:
    """Seconds to wait before retrying a 503, or None to stop."""
    if r.status_code != 503 or 503 in call.ok or attempt >= retries:
        return None
    ra = r.headers.get("retry-after", "")
    return float(ra) if ra.replace(".", "", 1).isdigit() else 0.1 * 2 ** attempt


class Client(_Api):
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0, retries: int = 0,
                 **httpx_kwargs) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout, **httpx_kwargs)
        self.retries = retries

    def _do(self, call: _Call):
        attempt = 0
        while True:
            r = self.http.request(call.method, call.path, json=call.json, content=call.content,
                                  headers=call.headers)
            delay = _retry_delay(r, call, attempt, self.retries)
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
                 **httpx_kwargs) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, **httpx_kwargs)
        self.retries = retries

    async def _do(self, call: _Call):
        import asyncio

        attempt = 0
        while True:
            r = await self.http.request(call.method, call.path, json=call.json, content=call.content,
                                        headers=call.headers)
            delay = _retry_delay(r, call, attempt, self.retries)
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
