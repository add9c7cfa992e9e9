"""What an ingest step read, kept and dropped, and why.

Every ``reolm prepare`` / ``reolm import`` run fills one :class:`IngestReport`; it is printed at
the end of the run and saved in ``domain.json`` under ``"ingest"`` so a processed folder always
says where its data came from and what was thrown away.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_EXAMPLES = 10  # problem lines quoted per reason; the counts are always complete


@dataclass
class IngestReport:
    """Counters of what was read / kept / dropped, plus a few example problem locations."""

    read: Counter = field(default_factory=Counter)
    kept: dict[str, int] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, where: str | None = None, count: int = 1) -> None:
        """Count ``count`` dropped records for ``reason``; remember ``where`` as an example."""
        self.dropped[reason] += count
        if where is not None:
            examples = self.examples.setdefault(reason, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(where)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {"read": dict(self.read), "kept": dict(self.kept),
                "dropped": {k: v for k, v in self.dropped.items() if v},
                "examples": self.examples, "notes": self.notes}

    def summary(self) -> str:
        """Human-readable multi-line summary for the end of a command."""
        lines = ["read:    " + ", ".join(f"{k}={v:,}" for k, v in self.read.items()),
                 "kept:    " + ", ".join(f"{k}={v:,}" for k, v in self.kept.items())]
        dropped = {k: v for k, v in self.dropped.items() if v}
        lines.append("dropped: " + (", ".join(f"{k}={v:,}" for k, v in dropped.items()) or "nothing"))
        for reason, where in self.examples.items():
            lines.append(f"  e.g. {reason}: " + "; ".join(where[:3]))
        lines.extend(f"note:    {n}" for n in self.notes)
        return "\n".join(lines)
