"""The exception hierarchy. Every error ntkdist raises on purpose is an NtkdistError.

Each subclass also derives from the built-in exception a caller would expect
(``ValueError`` for bad arguments, ``OSError`` for stores, ``RuntimeError`` for
failed execution), so ``except ValueError`` keeps working for code that does
not know ntkdist.

::

    NtkdistError
    ├── InputError (ValueError)           an argument is not what was expected
    │   ├── ModelError                    the model's outputs are malformed
    │   └── KernelInputError              a kernel given to a consumer is malformed
    │       ├── FingerprintMismatchError  kernels from different models or data
    │       └── IncompleteKernelError     an unfinished store, or NaN read back
    ├── PlanError (ValueError)            no tile plan fits the request
    ├── StoreError (OSError)              a store cannot be created, opened, written
    │   ├── ResumeMismatchError           the store holds a different job
    │   ├── StoreLockedError              another live job holds the store
    │   │   └── LockLostError             this job's lock was taken over
    │   └── StoreWriteError               the store is read-only or full
    ├── ExecutionError (RuntimeError)     tiles failed; a rerun resumes
    ├── SolverError (RuntimeError)        a kernel solve failed
    └── ClusterError (RuntimeError)       a Dask worker is not set up as required
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping


class NtkdistError(Exception):
    """Base class of all ntkdist errors.

    Args:
        message: what went wrong and what to do, in the Python API's words.
        keywords: the Python keyword settings the message advises (for example
            ``"check_finite=False"``), so that a front end with other words for
            them (the command line's flags) can say its own; see
            :meth:`message_for`.
    """

    def __init__(self, *args: object, keywords: Iterable[str] = ()) -> None:
        super().__init__(*args)
        self.keywords = tuple(keywords)

    def message_for(self, words: Mapping[str, str]) -> str:
        """The message with each Python keyword setting it names said as ``words``
        says it (``{"check_finite=False": "--allow-nonfinite"}``).

        A ``(CLI: ...)`` aside is dropped once its keyword is translated.

        Example:
            >>> err = InputError("pass x=True (CLI: --x) to go on", keywords=["x=True"])
            >>> err.message_for({"x=True": "--x"})
            'pass --x to go on'
        """
        text = str(self)
        for kw in sorted({*self.keywords, *words}, key=len, reverse=True):
            if kw not in words:
                continue
            pattern = r"(?<![\w.])" + re.escape(kw) + r"(\s*\(CLI: [^)]*\))?"
            text = re.sub(pattern, lambda _m, kw=kw: words[kw], text)
        return text


class InputError(NtkdistError, ValueError):
    """An argument (model, params, inputs, option name) is not what was expected."""


class ModelError(InputError):
    """The model function returned something other than an ``[n, O]`` array."""


class KernelInputError(InputError):
    """A kernel given to a consumer is malformed or does not fit the others."""


class FingerprintMismatchError(KernelInputError):
    """Two kernels that must come from one model and training set do not."""


class IncompleteKernelError(KernelInputError):
    """The kernel store is unfinished, or a tile read back holds NaN."""


class PlanError(NtkdistError, ValueError):
    """No tile plan satisfies the request (for example too small a memory budget)."""


class StoreError(NtkdistError, OSError):
    """A kernel store cannot be created, opened or written as asked."""


class ResumeMismatchError(StoreError):
    """The store holds a different job than the one being resumed."""

    def __init__(
        self,
        message: str,
        differences: dict[str, tuple[object, object]],
        *,
        keywords: Iterable[str] = (),
    ):
        super().__init__(message, keywords=keywords)
        self.differences = differences


class StoreLockedError(StoreError):
    """Another live job holds the store's lock."""


class LockLostError(StoreLockedError):
    """The job's lock was taken over by another job (it was paused past the timeout)."""


class StoreWriteError(StoreError):
    """The store cannot be written (read-only, full, forbidden); no retry helps."""


class ExecutionError(NtkdistError, RuntimeError):
    """One or more tiles failed; finished tiles stay recorded and a rerun resumes."""


class SolverError(NtkdistError, RuntimeError):
    """A kernel solve failed: not positive definite, or CG did not converge."""


class ClusterError(NtkdistError, RuntimeError):
    """A Dask worker is not set up as the engine needs (devices, environment)."""
