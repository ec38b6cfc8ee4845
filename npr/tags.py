"""The eight structural tags of a parallel reasoner (spec/NPR.md §1), in spec order."""
from __future__ import annotations

GUIDELINE_OPEN, GUIDELINE_CLOSE = "<guideline>", "</guideline>"
PLAN_OPEN, PLAN_CLOSE = "<plan>", "</plan>"
STEP_OPEN, STEP_CLOSE = "<step>", "</step>"
TAKEAWAY_OPEN, TAKEAWAY_CLOSE = "<takeaway>", "</takeaway>"

TAGS: tuple[str, ...] = (
    GUIDELINE_OPEN, GUIDELINE_CLOSE, PLAN_OPEN, PLAN_CLOSE,
    STEP_OPEN, STEP_CLOSE, TAKEAWAY_OPEN, TAKEAWAY_CLOSE,
)
