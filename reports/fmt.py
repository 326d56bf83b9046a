"""Number formatting for reports: a value with its ± error, to the precision the error allows."""

from __future__ import annotations

import math

DASH = "—"


def _trim_exp(s: str) -> str:
    """``1.2e-06`` -> ``1.2e-6``."""
    if "e" in s:
        mant, exp = s.split("e")
        return f"{mant}e{int(exp)}"
    return s


def num(v, sig: int = 4) -> str:
    """A plain number: integers with thousands separators, others to ``sig`` significant digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return DASH
    v = float(v)
    if abs(v) >= 1000 and abs(v) < 1e15:
        return f"{v:,.0f}"
    if v == 0:
        return "0"
    return _trim_exp(f"{v:.{sig}g}")


def decimals_for(err: float) -> int | None:
    """Decimal places that show ``err`` to two significant digits (None for scientific notation)."""
    if not err or not math.isfinite(err):
        return None
    exp = math.floor(math.log10(abs(err)))
    if exp < -5 or exp > 5:
        return None
    return max(0, 1 - exp)


def pm(v, err=None, sig: int = 4) -> str:
    """``value ± error`` with the value rounded where the error's second digit is."""
    if v is None or v != v:
        return DASH
    if err is not None and err != err:  # NaN from a frame: no error recorded
        err = None
    d = decimals_for(err) if err is not None else None
    if d is None:
        return num(v, sig) if not err else f"{num(v, sig)} ± {num(err, 2)}"
    return f"{float(v):,.{d}f} ± {float(err):,.{d}f}"


def unit_suffix(unit: str | None) -> str:
    if not unit:
        return ""
    if unit in ("%", "x"):
        return "×" if unit == "x" else "%"
    return f" {unit}"


def with_unit(v, err=None, unit: str | None = None) -> str:
    """``pm`` followed by the unit (``%`` and ``×`` glued on)."""
    s = pm(v, err)
    if s == DASH:
        return s
    return s + unit_suffix(unit)


def bytes_h(v) -> str:
    """Bytes in binary multiples: ``4.57 MiB``."""
    if v is None:
        return DASH
    v = float(v)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.3g} {unit}"
        v /= 1024
    return DASH  # unreachable


def short_commit(commit: str | None, dirty: bool | None = None) -> str:
    if not commit:
        return "no commit"
    return commit[:10] + ("+dirty" if dirty else "")


def date(iso: str | None) -> str:
    """``2026-11-28T03:48:41+00:00`` -> ``2026-11-28 03:48 UTC``."""
    if not iso:
        return DASH
    day, _, rest = iso.partition("T")
    return f"{day} {rest[:5]} UTC" if rest else day
