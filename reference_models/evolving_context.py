"""(placeholder — filled by its issue)."""
from invariants import Case

SYSTEM = "evolving_context"


def cases() -> list[Case]:
    return []
