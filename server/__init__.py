"""fwserve's serving process: HTTP API, micro-batching, session store, client."""

__version__ = "0.1.0"
