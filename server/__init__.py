"""fwserve's serving process, in layers that talk through small typed interfaces:

    server/api/       HTTP (FastAPI): routes, schemas, auth, decoding, errors -> status codes
    server/engine/    the facade the API calls: batcher, executor, feature cache, metrics
    server/sessions/  all mutable state: sessions, slots, tiers, write-ahead log, backends
    server/rules/     adaptation rules, one module each, in one registry
    kernels/          the head ops (Triton on CUDA, batched torch on CPU)

Shared vocabulary beside them: config (settings), errors (domain errors), keys (session keys);
client (a Python client of the API) and cli (the command line). See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
