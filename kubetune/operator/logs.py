"""Structured operator logs: every line a pass logs names the object it is about.

kopf's per-object loggers put an object reference on their records (``record.k8s_ref``), rendered
as a ``[namespace/name]`` prefix in text and as an ``object`` field in JSON (``--log-format json``,
kopf's JSON formatter). A pass sets the object it works on in a context variable
(:func:`about`), and :class:`ObjectReferenceFilter` puts it on every record logged meanwhile, so
the reconcilers' module loggers come out the same way as kopf's. kopf runs each sync handler in a
copy of the context, so concurrent passes in its thread pool do not see each other's object.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[dict[str, str] | None] = ContextVar("kubetune_object", default=None)


@contextmanager
def about(kind: str, namespace: str, name: str) -> Iterator[None]:
    """Log records made inside carry ``kind``, ``namespace`` and ``name`` of this object."""
    token = _current.set({"kind": kind, "namespace": namespace, "name": name})
    try:
        yield
    finally:
        _current.reset(token)


class ObjectReferenceFilter(logging.Filter):
    """Adds the current object as ``record.k8s_ref`` unless the record names one already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "k8s_ref") and (ref := _current.get()) is not None:
            record.k8s_ref = ref
        return True


#: The text format (kopf's own FULL format truncates logger names, which hides urllib3's requests).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PrefixingFormatter(logging.Formatter):
    """Text lines with the object as a ``[namespace/name]`` prefix of the message, as kopf writes them."""

    def format(self, record: logging.LogRecord) -> str:
        ref = getattr(record, "k8s_ref", None)
        if ref:
            prefix = (
                f"[{ref.get('namespace')}/{ref.get('name')}]"
                if ref.get("namespace")
                else f"[{ref.get('name')}]"
            )
            record = logging.makeLogRecord({**record.__dict__, "msg": f"{prefix} {record.msg}"})
        return super().format(record)


def configure(verbose: bool, json_format: bool) -> None:
    """Root logging for the operator process: text with ``[namespace/name]`` prefixes, or JSON lines
    (kopf's JSON formatter) with the object under ``object``."""
    import kopf

    if json_format:
        kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON, log_refkey="object")
    else:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO)
        logging.getLogger().handlers[0].setFormatter(PrefixingFormatter(TEXT_FORMAT))
    for handler in logging.getLogger().handlers:
        handler.addFilter(ObjectReferenceFilter())
