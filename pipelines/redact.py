"""Credential redaction for everything MaaS prints, logs, tags or writes as an artifact.

``redact(text)`` masks, anywhere in a string: the password in URL userinfo
(``scheme://user:pw@host``), secret-looking query parameters (``?password=``, ``token=``,
``secret=``, ``access_key=``, ... case-insensitive) and the same keys in libpq DSN
``key=value`` form (``host=db password=pw``). Text without credentials comes back unchanged.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# key names whose values are secrets (matched as a whole key, case-insensitive)
_SECRET_KEYS = (r"(?:password|passwd|pwd|pass|token|access[_-]?token|auth[_-]?token|secret"
                r"|client[_-]?secret|secret[_-]?key|access[_-]?key|api[_-]?key|sslpassword"
                r"|x-amz-signature|x-amz-credential|x-amz-security-token|sig|signature)")

# scheme://user:password@  (the password may not contain "@" "/" or whitespace)
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@?#]*):(?P<pw>[^\s/@]*)@")
# ?key=value / &key=value / ;key=value
_QUERY = re.compile(r"(?P<head>[?&;]" + _SECRET_KEYS + r"=)(?P<val>[^&#\s;]*)", re.IGNORECASE)
# DSN: start or whitespace, key = value, value quoted or bare
_DSN = re.compile(r"(?P<head>(?:^|(?<=\s))" + _SECRET_KEYS + r"\s*=\s*)"
                  r"(?P<val>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s'\"]+)", re.IGNORECASE)


def redact(text: Any) -> Any:
    """``text`` with every credential masked; non-strings are returned as they are."""
    if not isinstance(text, str) or not text:
        return text
    out = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@" if m["pw"] else m[0], text)
    out = _QUERY.sub(lambda m: m["head"] + MASK, out)
    return _DSN.sub(lambda m: m["head"] + MASK, out)


def redact_obj(obj: Any) -> Any:
    """``redact`` applied to every string in a JSON-like structure (dicts, lists, tuples)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {redact_obj(k): redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """A handler filter that masks credentials in every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
