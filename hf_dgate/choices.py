"""The string options the code compares, as `str` enums: a member equals its plain string (configs stay plain JSON)
and prints as it, so a typo in code is an AttributeError instead of a comparison that is silently never true."""

from __future__ import annotations

from enum import Enum


class StrChoice(str, Enum):
    """A `str` enum that formats as its value on every Python the project supports (3.10 has no `StrEnum`)."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Where(StrChoice):
    """Where a gate acts at a site: a module's input (pre-hook), its output (hook), or one of its parameters."""

    INPUT = "input"
    OUTPUT = "output"
    PARAM = "param"


class AttentionKind(StrChoice):
    SELF = "self"
    CROSS = "cross"


class HeadSide(StrChoice):
    """Which activation a head gate scales (DGateConfig.head_side)."""

    AUTO = "auto"
    VALUE = "value"
    OUTPUT = "output"


class ThresholdMode(StrChoice):
    ABSOLUTE = "absolute"
    RELATIVE = "relative"


class GroupKind(StrChoice):
    """What a user rule's groups are (GroupRule.kind): output features, input features, or whole modules."""

    OUT = "out"
    IN = "in"
    MODULE = "module"
