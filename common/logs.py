"""Structured logs: one JSON object a line on stderr, in every slora process.

Each line has `ts` (Unix seconds), `level`, `process` (frontend, scheduler, worker),
`logger` and `msg`, then any `extra=` fields of the call. A request's lines carry its
`request_id`: the frontend makes the id (the client's id plus a random suffix), sends it to
the scheduler in SubmitRequest.request_id, and the scheduler to the worker in the step
command, so one grep follows a request through all three processes:

    {"ts": 1718.2, "level": "INFO", "process": "frontend", "logger": "slora.frontend",
     "msg": "request finished", "request_id": "r1-3f2a9c1b7d0e", "code": "OK", ...}

Inside an asyncio handler the id may come from `request_id_var` (a ContextVar) instead of
`extra`; a worker thread passes it in `extra`.
"""
from __future__ import annotations

import argparse
import contextvars
import json
import logging
import sys

NO_REQUEST_ID = ""
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "slora_request_id", default=NO_REQUEST_ID)
"""The request id of the call being served, for log lines that do not name one."""

_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str):
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 6), "level": record.levelname,
                 "process": self.process_name, "logger": record.name,
                 "msg": record.getMessage()}
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def add_log_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="least severe level")
    parser.add_argument("--log-format", default="json", choices=["json", "text"],
                        help="json: one JSON object a line (default); text: for a terminal")


def setup_logging(process_name: str, level: str = "INFO", fmt: str = "json") -> None:
    """Sends every logger's records to stderr in `fmt`, replacing earlier handlers; Python
    warnings and an uncaught exception become log records too, so that stderr stays one
    JSON object a line."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process_name))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {process_name} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)

    def log_uncaught(kind, value, traceback):
        logging.getLogger(f"slora.{process_name}").critical(
            "uncaught %s: %s", kind.__name__, value, exc_info=(kind, value, traceback))

    sys.excepthook = log_uncaught
