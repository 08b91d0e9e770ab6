"""Byte quantities as people write them ("16GiB", "40 GB") and as reports print them."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``"16GiB"`` -> 17179869184. Decimal units (KB, MB, GB, TB), binary ones (KiB .. TiB, and
    K, M, G, T as nvidia-smi means them), or a plain number of bytes."""
    match = _QUANTITY.match(str(text))
    unit = match and match.group(3).lower()
    if not match or unit not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as an amount of memory; write it like 16GiB, 40GB, 15360MiB or 80G"
        )
    value = float(match.group(1)) * (10 ** int(match.group(2)) if match.group(2) else 1)
    return int(value * _UNITS[unit])


def format_bytes(n: int | float | None) -> str:
    """Binary units with three significant figures: 1536 -> "1.50 KiB"; None -> "?"."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        # 999.5 up: three figures would read 1.00e+03 (1023.6 KiB printed "1.02e+03 KiB")
        if abs(n) < (1024 if unit == "B" else 999.5) or unit == "TiB":
            break
        n /= 1024
    if unit == "B":
        return f"{int(n)} B"
    return f"{n:.3g} {unit}" if abs(n) >= 100 else f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}"


def format_ratio(before: int | None, after: int | None) -> str:
    """``before / after`` as "12.3x"; "-" when it means nothing."""
    if not before or not after:
        return "-"
    return f"{before / after:.1f}x"
