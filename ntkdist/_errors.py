"""The exception hierarchy. Every error ntkdist raises on purpose is an NtkdistError.

Each subclass also derives from the built-in exception a caller would expect
(``ValueError`` for bad arguments, ``RuntimeError`` for failed execution), so
``except ValueError`` keeps working for code that does not know ntkdist.
"""

from __future__ import annotations


class NtkdistError(Exception):
    """Base class of all ntkdist errors."""


class InputError(NtkdistError, ValueError):
    """An argument (model, params, inputs, option name) is not what was expected."""


class ModelError(InputError):
    """The model function returned something other than an ``[n, O]`` array."""


class PlanError(NtkdistError, ValueError):
    """No tile plan satisfies the request (for example too small a memory budget)."""


class StoreError(NtkdistError, OSError):
    """A kernel store cannot be created, opened or written as asked."""


class ResumeMismatchError(StoreError):
    """The store holds a different job than the one being resumed."""

    def __init__(self, message: str, differences: dict[str, tuple[object, object]]):
        super().__init__(message)
        self.differences = differences


class StoreLockedError(StoreError):
    """Another live job holds the store's lock."""


class ExecutionError(NtkdistError, RuntimeError):
    """One or more tiles failed; finished tiles stay recorded and a rerun resumes."""
