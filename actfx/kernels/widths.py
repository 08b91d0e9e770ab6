"""The widths a pack can take, and what each costs in code bytes.

Widths are named by their storage per value: 1, 2, 4 and 8 bits hold ``2**b`` levels, and
``TERNARY`` (written 1.6) holds three levels, five values per byte (3**5 = 243 <= 256). Why
three levels: stochastic rounding's variance is ``step^2 f (1 - f)`` with ``step = range / L``
(L levels above the lowest), so per group of 256 values (plus 4 bytes of min and step)

    width      bytes  bits per value   variance, in units of 2-bit's
    1 bit        36       1.125            9
    three-level  56       1.75             2.25
    2 bits       68       2.125            1

and the three-level point lies well below the line from 1 bit to 2 bits (5.6 there at 1.75
bits): a planner mixing widths to a byte budget between 1 and 2 bits loses less gradient
variance with it than with any mix of 1 and 2 bits.
"""

from __future__ import annotations

TERNARY = 1.6  # three levels, five values per byte
ALLOWED_BITS = (1, TERNARY, 2, 4, 8)
TRITS_PER_BYTE = 5
TRIT_WEIGHTS = (1, 3, 9, 27, 81)  # value 5j + k of a group is base-3 digit k of its byte j


def check_bits(bits: object) -> int | float:
    """Return `bits` if it is one of ``ALLOWED_BITS``; TypeError / ValueError naming it otherwise."""
    if isinstance(bits, bool) or not (isinstance(bits, int) or bits == TERNARY and isinstance(bits, float)):
        raise TypeError(f"bits must be an int in {{1, 2, 4, 8}} or the float 1.6 (three levels), "
                        f"got {bits!r} ({type(bits).__name__})")
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be one of {{1, 1.6, 2, 4, 8}} (1.6: three levels, five values per byte), "
                         f"got {bits}")
    return bits


def width(bits: int | float) -> int | float:
    """A width as the kernels name it: an int for 1/2/4/8 (a float 2.0 from an op schema becomes
    2), ``TERNARY`` for three levels."""
    return TERNARY if bits == TERNARY else int(bits)


def levels(bits: int | float) -> int:
    """L, the number of steps between a group's lowest and highest level."""
    return 2 if bits == TERNARY else (1 << int(bits)) - 1


def per_byte(bits: int | float) -> int:
    """Codes a byte holds: ``8 / bits``, five base-3 digits for three levels."""
    return TRITS_PER_BYTE if bits == TERNARY else 8 // int(bits)


def of_levels(levels: int) -> int | float:
    """The width with ``levels`` steps (the inverse of :func:`levels`)."""
    return TERNARY if levels == 2 else (levels + 1).bit_length() - 1


def code_bytes(bits: int | float, group_size: int) -> int:
    """Code bytes per group: ``G * b / 8``, or ``ceil(G / 5)`` for three levels."""
    if bits == TERNARY:
        return -(-group_size // TRITS_PER_BYTE)
    return group_size * int(bits) // 8


def code_bits(bits: int | float, group_size: int) -> float:
    """Code bits per value as stored (1.625 for three levels in groups of 256; meta not counted):
    what a plan's average width counts."""
    return code_bytes(bits, group_size) * 8 / group_size
