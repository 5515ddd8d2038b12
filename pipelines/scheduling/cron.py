"""Cron strings -> APScheduler triggers: 5-field standard cron (0/7 = Sunday, macros) or 6 fields
with a leading seconds field."""

from __future__ import annotations

MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
_DOW_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]  # standard cron: 0 (and 7) = Sunday


class ScheduleError(ValueError):
    """A schedule string (or a scheduler setting) that cannot be used."""


def normalize_cron(expr: str) -> list[str]:
    """The cron fields of ``expr``: 5 (standard) or 6 (leading seconds); macros expanded."""
    expr = (expr or "").strip()
    expr = MACROS.get(expr.lower(), expr)
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ScheduleError(f"schedule {expr!r}: expected 5 cron fields (minute hour day month "
                            f"weekday) or 6 with leading seconds, got {len(fields)}")
    return fields


def _weekday(tok: str) -> int:
    if tok in _DOW_NAMES:
        return _DOW_NAMES.index(tok)
    n = int(tok)
    if not 0 <= n <= 7:
        raise ValueError(f"weekday {n} out of range 0-7")
    return n


def _day_of_week(spec: str) -> str:
    """Standard-cron weekday field (0/7 = Sunday) -> APScheduler's (names; its 0 is Monday)."""
    if spec in ("*", "?"):
        return "*"
    days: set[int] = set()
    for item in spec.lower().split(","):
        rng, _, step_s = item.partition("/")
        step = int(step_s) if step_s else 1
        if step < 1:
            raise ValueError(f"bad step in {item!r}")
        if rng in ("*", "?"):
            lo, hi = 0, 6
        elif "-" in rng:
            a, b = rng.split("-", 1)
            lo, hi = _weekday(a), _weekday(b)
            if lo > hi:
                raise ValueError(f"range {rng!r} goes backwards")
        else:
            lo = _weekday(rng)
            hi = 6 if step_s else lo
        days.update(d % 7 for d in range(lo, hi + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(_DOW_NAMES[d] for d in sorted(days))


def build_trigger(expr: str, tz: str = "UTC"):
    """A ``CronTrigger`` for a 5-field (``CronTrigger.from_crontab``) or 6-field cron string."""
    from apscheduler.triggers.cron import CronTrigger

    fields = normalize_cron(expr)
    try:
        if len(fields) == 5:
            fields[4] = _day_of_week(fields[4])
            return CronTrigger.from_crontab(" ".join(fields), timezone=tz)
        second, minute, hour, day, month, dow = fields
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_day_of_week(dow), timezone=tz)
    except (ValueError, KeyError, LookupError) as exc:
        raise ScheduleError(f"schedule {expr!r}: {exc}") from None
