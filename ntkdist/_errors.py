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


class NtkdistError(Exception):
    """Base class of all ntkdist errors."""


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

    def __init__(self, message: str, differences: dict[str, tuple[object, object]]):
        super().__init__(message)
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
