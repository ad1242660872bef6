"""(placeholder — filled by its issue)."""
from invariants import Case

SYSTEM = "hyperlora"


def cases() -> list[Case]:
    return []
