"""The Open Inference Protocol over gRPC: KServe v2's ``inference.GRPCInferenceService`` on
``--grpc-port``, in the HTTP server's event loop, sharing its engine, auth, decoder and
inference core (server/api/v2/infer.py).

The message and service stubs are the ones generated from the protocol's proto files that ship
inside the ``tritonclient`` package (``tritonclient.grpc.service_pb2``/``_grpc``, with
``model_config_pb2``): the same definitions the stock clients are built on, so nothing is
compiled at build time (``pip install 'fwserve[grpc]'``).

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelInfer (inputs as raw_input_contents or typed contents; outputs as raw_output_contents).
Others (streaming, statistics, repository, shared memory, trace, logging) answer UNIMPLEMENTED.
Auth: the API key as ``authorization: Bearer KEY`` or ``x-api-key`` metadata; errors carry the
gRPC status of the HTTP one (server/api/errors.py GRPC_STATUS) and the message.
"""

from __future__ import annotations

import logging
import time

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from server.api.access import AccessRecord, request_id
from server.api.context import Api
from server.api.errors import GRPC_STATUS, ApiError, from_domain
from server.api.hot import valid_idempotency_key
from server.api.v2 import infer as oip
from server.api.v2 import model as m
from server.api.v2.tensors import Tensor
from server.errors import DomainError, invalid


log = logging.getLogger("fwserve.grpc")
SERVICE = "/inference.GRPCInferenceService/"
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _param_value(p: service_pb2.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _set_param(p: service_pb2.InferParameter, value) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, api: Api) -> None:
        self.api, self.engine, self.settings = api, api.engine, api.settings

    async def _call(self, method: str, context, fn):
        """Run one call: errors -> gRPC status, the duration metric and the access line."""
        start = time.perf_counter()
        meta = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        rec = AccessRecord(request_id(meta.get("x-request-id")))
        status = 200
        try:
            context.set_trailing_metadata((("x-request-id", rec.request_id),))
            return await fn(meta, rec)
        except (ApiError, DomainError) as e:
            err = e if isinstance(e, ApiError) else from_domain(e)
            status = err.status
            ra = err.headers.get("Retry-After")
            if ra is not None:
                context.set_trailing_metadata((("x-request-id", rec.request_id), ("retry-after", ra)))
            await context.abort(getattr(grpc.StatusCode, GRPC_STATUS.get(err.status, "UNKNOWN")), err.message)
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            status = 500
            log.exception("grpc %s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            elapsed = time.perf_counter() - start
            self.api.metrics.request_duration.labels(route=SERVICE + method, method="GRPC",
                                                        status=str(status)).observe(elapsed)
            rec.emit("GRPC", SERVICE + method, status, elapsed, protocol="grpc")

    def _model(self, name: str, version: str) -> str:
        return m.check_model(self.settings.backbone, name, version or None)

    # ---- health and metadata ----------------------------------------------------------------

    async def ServerLive(self, request, context):
        return await self._call("ServerLive", context, self._live)

    async def _live(self, meta, rec):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        async def run(meta, rec):
            return service_pb2.ServerReadyResponse(ready=self.engine.ready)
        return await self._call("ServerReady", context, run)

    async def ModelReady(self, request, context):
        async def run(meta, rec):  # an unknown model or version is not ready (as the HTTP client reads a 404)
            try:
                self._model(request.name, request.version)
            except ApiError:
                return service_pb2.ModelReadyResponse(ready=False)
            return service_pb2.ModelReadyResponse(ready=self.engine.ready)
        return await self._call("ModelReady", context, run)

    async def ServerMetadata(self, request, context):
        async def run(meta, rec):
            return service_pb2.ServerMetadataResponse(**m.server_metadata())
        return await self._call("ServerMetadata", context, run)

    async def ModelMetadata(self, request, context):
        async def run(meta, rec):
            self._model(request.name, request.version)
            self.engine.check_ready()
            md = m.metadata(self.engine.model)
            tm = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=md["name"], versions=md["versions"], platform=md["platform"],
                inputs=[tm(**t) for t in md["inputs"]], outputs=[tm(**t) for t in md["outputs"]])
        return await self._call("ModelMetadata", context, run)

    async def ModelConfig(self, request, context):
        async def run(meta, rec):
            self._model(request.name, request.version)
            self.engine.check_ready()
            cfg = m.config(self.engine.model, self.settings.max_instances, self.settings.max_top_k)
            return service_pb2.ModelConfigResponse(config=json_format.ParseDict(cfg, model_config_pb2.ModelConfig()))
        return await self._call("ModelConfig", context, run)

    # ---- inference --------------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        async def run(meta, rec):
            name = self._model(request.model_name, request.model_version)
            p = self.api.auth.authenticate(meta)
            rec.update(key_id=p.key_id)
            self.engine.check_ready()
            opts = oip.options({k: _param_value(v) for k, v in request.parameters.items()
                                if k != "binary_data_output"})
            requested = oip.requested_outputs([
                {"name": o.name, "parameters": {k: _param_value(v) for k, v in o.parameters.items()
                                                if k != "binary_data"}} for o in request.outputs] or None)
            idem_key = meta.get("idempotency-key")
            if idem_key is not None and not valid_idempotency_key(idem_key):
                raise invalid("invalid_request", "idempotency-key must have 1..255 visible ASCII characters")
            outcome = await oip.infer(self.api, p, _inputs(request), opts, requested, idem_key, rec)
            resp = service_pb2.ModelInferResponse(model_name=name, model_version=m.VERSION, id=request.id)
            for k, v in outcome.parameters.items():
                _set_param(resp.parameters[k], v)
            if outcome.replayed:
                _set_param(resp.parameters["idempotent_replayed"], True)
            for out in outcome.outputs:
                resp.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
                resp.raw_output_contents.append(out.raw())
            return resp
        return await self._call("ModelInfer", context, run)


def _inputs(request) -> list[Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise invalid("invalid_inputs", f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    out = []
    for i, t in enumerate(request.inputs):
        if any(k.startswith("shared_memory") for k in t.parameters):
            raise invalid("unsupported", "the shared-memory extensions are not supported")
        if raw:
            data = raw[i]
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None:
                raise invalid("invalid_inputs", f"inputs[{i}]: unsupported datatype {t.datatype!r}")
            data = list(getattr(t.contents, field))
        out.append(Tensor(t.name, t.datatype, [int(n) for n in t.shape], data))
    return out


async def start(api: Api, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """The gRPC server, started on host:port in the running event loop -> (server, bound port)."""
    limit = api.settings.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", max(limit, 4 * 1024 * 1024))])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(api), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise RuntimeError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()
    log.info("gRPC (KServe v2 GRPCInferenceService) on %s:%d", host, bound,
             extra={"event": "grpc_started", "host": host, "port": bound})
    return server, bound

