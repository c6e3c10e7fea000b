"""The Open Inference Protocol v2 (KServe v2): HTTP routes (routes.py), the gRPC service
(grpc_service.py, with --grpc-port), one inference core both share (infer.py), tensors and the
binary tensor extension (tensors.py), model metadata and configuration (model.py)."""

from server.api.v2.routes import add_routes

__all__ = ["add_routes"]
