"""Errors the user sees: one line that names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class HistoError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    ``path`` is the file (or folder) at fault, ``problem`` a short sentence saying what is wrong.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class SlideError(HistoError):
    """The slide file cannot be read: not a slide, truncated, corrupt, no pixel size."""


class WorkflowError(HistoError):
    """A workflow preset is invalid: unknown key, wrong type."""


class ModelError(HistoError):
    """A nucleus model cannot be found or loaded."""
