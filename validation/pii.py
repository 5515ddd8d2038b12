"""Personal data in text: PII expectations for any suite, and the one text redactor.

``pii_expectations(column, mostly)`` returns suite entries (the JSON shape ``validation/gate.py``
loads) that flag e-mail addresses, phone numbers, payment card numbers and IBANs with GX Core's
``expect_column_values_to_not_match_regex``. ``redact_text(s)`` masks the same four kinds in a
string and is what ``privacy.log_text: redacted`` applies to every text the pipeline logs;
``loggable_texts`` / ``scrub`` apply a log_text mode to a list of texts / any JSON-able value.

Limitation: a regex cannot check a Luhn (card) or mod-97 (IBAN) checksum, and GX 1.x has no public
API for a custom per-row pandas check, so the *expectations* flag card-shaped and IBAN-shaped
numbers, checksum or not (a 16-digit order number starting like a card number is flagged; use
``mostly`` to tolerate a few). ``redact_text`` is exact: it masks a card number only when it is
Luhn-valid and an IBAN only when its mod-97 check holds.
"""

from __future__ import annotations

import re
from typing import Any, Literal

LogText = Literal["full", "redacted", "none"]
LOG_TEXT_MODES: tuple[str, ...] = ("full", "redacted", "none")

#: what ``none`` puts where a data text was (examples, GX unexpected values, report values)
WITHHELD = "[withheld: privacy.log_text=none]"
#: a synthetic model input example: never data
PLACEHOLDER_TEXT = "an example text"

EMAIL_REGEX = r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])"
# +CC ... (international, 8+ digits in groups), (555) 123-4567, 555-123-4567 / 555.123.4567
PHONE_REGEX = (r"(?<![\w+])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?"
               r"\d{2,4}(?:[\s.-]?\d{2,4}){2,4}"
               r"|\(\d{3}\)[\s.-]?\d{3}[\s.-]\d{4}|\d{3}[\s.-]\d{3}[\s.-]\d{4})(?![\w-])")
# issuer prefixes (Visa 4, Mastercard 51-55 / 22-27, Amex 34/37, Discover 6011/65), 13-19 digits,
# single spaces or hyphens allowed between digits; not the digit groups of a spaced IBAN
CARD_REGEX = (r"(?<![\w-])(?<![A-Z]{2}\d\d )"
              r"(?:4\d|5[1-5]|2[2-7]|3[47]|6(?:011|5\d))(?:[ -]?\d){11,17}(?![\w-])")
# country code, 2 check digits, 11-30 alphanumerics (optionally in groups of four)
IBAN_REGEX = r"(?<![\w-])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![\w-])"

_KINDS: tuple[tuple[str, str, str, str], ...] = (
    # (name, regex, mask, why)
    ("email", EMAIL_REGEX, "[EMAIL]", "e-mail addresses are personal data"),
    ("iban", IBAN_REGEX, "[IBAN]",
     "IBANs identify bank accounts (regex: IBAN-shaped, mod-97 not checked)"),
    ("card", CARD_REGEX, "[CARD]",
     "payment card numbers (regex: card-shaped digit runs, Luhn not checked)"),
    ("phone", PHONE_REGEX, "[PHONE]", "phone numbers are personal data"),
)
_COMPILED = {name: re.compile(rx) for name, rx, _, _ in _KINDS}


def pii_expectations(column: str = "text", mostly: float = 1.0) -> list[dict[str, Any]]:
    """Suite entries (``type``, ``kwargs``, ``meta.why``) that fail when more than
    ``1 - mostly`` of ``column``'s values contain an e-mail, IBAN, card number or phone number."""
    if not isinstance(column, str) or not column:
        raise ValueError("pii_expectations: column must be a non-empty string")
    if not 0.0 <= float(mostly) <= 1.0:
        raise ValueError(f"pii_expectations: mostly must be within [0, 1] (got {mostly})")
    entries = []
    for name, rx, _, why in _KINDS:
        kwargs: dict[str, Any] = {"column": column, "regex": rx}
        if mostly < 1.0:
            kwargs["mostly"] = float(mostly)
        entries.append({"type": "expect_column_values_to_not_match_regex", "kwargs": kwargs,
                        "meta": {"why": f"PII ({name}): {why}", "pii": name}})
    return entries


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a digit string (non-digits are ignored)."""
    nums = [int(c) for c in digits if c.isdigit()]
    if len(nums) < 2:
        return False
    total = 0
    for i, d in enumerate(reversed(nums)):
        if i % 2:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """The ISO 13616 mod-97 check of an IBAN (spaces ignored)."""
    s = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", s):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_CHECKS = {"card": lambda m: luhn_valid(m), "iban": lambda m: iban_valid(m)}


def redact_text(s: str) -> str:
    """``s`` with e-mails, IBANs (mod-97 valid), card numbers (Luhn-valid) and phone numbers
    replaced by ``[EMAIL]``, ``[IBAN]``, ``[CARD]``, ``[PHONE]``. Pure; other text unchanged."""
    if not isinstance(s, str) or not s:
        return s
    out = s
    for name, _, mask, _ in _KINDS:
        check = _CHECKS.get(name)
        out = _COMPILED[name].sub(
            lambda m, c=check, k=mask: k if c is None or c(m.group(0)) else m.group(0), out)
    return out


def loggable_texts(texts: list[str], mode: str, n: int | None = None) -> list[str]:
    """Texts as a log_text mode allows them to leave the process: ``full`` as they are,
    ``redacted`` through :func:`redact_text`, ``none`` as the synthetic placeholder text."""
    check_mode(mode)
    texts = list(texts)[:n] if n is not None else list(texts)
    if mode == "full":
        return texts
    if mode == "redacted":
        return [redact_text(t) if isinstance(t, str) else t for t in texts]
    return [PLACEHOLDER_TEXT] * max(1, len(texts))


def scrub(value: Any, mode: str) -> Any:
    """Every string inside ``value`` (dicts, lists, tuples; keys kept) as ``mode`` allows:
    ``full`` unchanged, ``redacted`` via :func:`redact_text`, ``none`` replaced by
    :data:`WITHHELD`. Numbers, booleans and None stay (counts, row indexes, label ids)."""
    check_mode(mode)
    if mode == "full":
        return value
    if isinstance(value, dict):
        return {k: scrub(v, mode) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [scrub(v, mode) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        try:
            return scrub(value.item(), mode)
        except (TypeError, ValueError):
            pass
    text = value if isinstance(value, str) else str(value)
    return redact_text(text) if mode == "redacted" else WITHHELD


def check_mode(mode: str, what: str = "log_text mode") -> None:
    """Raise ValueError naming ``what`` unless ``mode`` is full, redacted or none."""
    if mode not in LOG_TEXT_MODES:
        raise ValueError(f"{what} must be one of {list(LOG_TEXT_MODES)} (got {mode!r})")
