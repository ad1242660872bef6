"""(placeholder — filled by its issue)."""
from invariants import Case

SYSTEM = "staged_modules"


def cases() -> list[Case]:
    return []
