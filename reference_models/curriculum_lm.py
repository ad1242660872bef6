"""(placeholder — filled by its issue)."""
from invariants import Case

SYSTEM = "curriculum_lm"


def cases() -> list[Case]:
    return []
