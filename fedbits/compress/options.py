"""Reading a stage's argument, the text after the colon in ``int8:block=128,sr``.

Every stage parses its own argument; these helpers give built-in and plugin stages
one syntax (comma-separated ``key=value`` options and bare flags) and one style of
message. They raise :class:`~fedbits.compress.codec.StageError`, which the chain
parser turns into a ConfigError naming the config key and the entry.
"""

from __future__ import annotations

from fractions import Fraction

from fedbits.compress.codec import StageError


def parse_options(text: str | None, allowed: set[str]) -> dict[str, str]:
    """``key=value`` and bare flags, comma-separated; a flag maps to ``""``. ``None``
    (no colon in the entry) is no options; an empty text after a colon is an error."""
    if text is None:
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in allowed:
            raise StageError(f"unknown option {key!r} (allowed: {', '.join(sorted(allowed))})")
        if key in out:
            raise StageError(f"option {key!r} given twice")
        out[key] = value
    return out


def int_option(opts: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    """An integer option within [low, high]; ``default`` when absent."""
    if key not in opts:
        return default
    try:
        value = int(opts[key])
    except ValueError:
        raise StageError(f"{key}={opts[key]!r} is not an integer") from None
    if not low <= value <= high:
        raise StageError(f"{key}={value} must lie in [{low}, {high}]")
    return value


def flag_option(opts: dict[str, str], key: str) -> bool:
    """Whether the bare flag ``key`` is set (``sr``, not ``sr=1``)."""
    if opts.get(key):
        raise StageError(f"{key} is a flag and takes no value")
    return key in opts


def no_options(name: str, text: str | None) -> None:
    """Refuse any argument, for a stage that takes none (``fp16``)."""
    if text is not None:
        raise StageError(f"{name} takes no options")


def density(text: str) -> Fraction:
    """A fraction in (0, 1], written as a number or a ratio (``0.0625``, ``1/16``).

    Normalised through the shortest float repr, so the value is exactly what the
    normalised spec string shows and both sides compute the same counts from it.
    """
    try:
        value = Fraction(repr(float(Fraction(text.strip()))))
    except (ValueError, ZeroDivisionError, OverflowError):
        raise StageError(f"density {text!r} is not a number or fraction in (0, 1]") from None
    if not 0 < value <= 1:
        raise StageError(f"density {text!r} must lie in (0, 1]")
    return value
