"""Log lines of a server process: text or JSON (``--log-format``), at ``--log-level``, for the
server's own loggers (``fwserve.*``: access lines, engine events, the store) and uvicorn's.

Structured fields travel as a record's extras (``log.info(msg, extra={"event": ..., ...})``):
JSON lines carry them as keys beside ``ts``, ``level``, ``logger`` and ``message``; text lines
append them as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Optional, TextIO

# attributes every LogRecord has: whatever else a record carries came in through `extra`
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName",
                                                                         "color_message"}
LOGGERS = ("fwserve", "uvicorn", "uvicorn.error")


def fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update(fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = fields(record)
        if extra.get("event") == "access":  # the message says it already
            for k in ("event", "method", "route", "status", "latency_ms"):
                extra.pop(k, None)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def level_of(name: str) -> int:
    return logging.DEBUG if name == "trace" else getattr(logging, name.upper())


def configure(level: str = "info", fmt: str = "text", stream: Optional[TextIO] = None) -> logging.Handler:
    """One handler on the root logger in the chosen format; the server's and uvicorn's loggers at
    `level`, everything else at warning. -> the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(level_of(level))
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the access line is fwserve.access's
    return handler
