"""Exceptions that name the case and the file they concern."""

from __future__ import annotations


class CaseDataError(ValueError):
    """Bad input for one case: unreadable file, wrong grid, wrong labels, NaNs."""

    def __init__(self, case_id: str | None, path: object, reason: str):
        self.case_id = case_id
        self.path = str(path)
        self.reason = reason
        who = f"case {case_id}" if case_id else "input"
        super().__init__(f"{who}: {self.path}: {reason}")
