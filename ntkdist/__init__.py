"""ntkdist: the finite-width empirical NTK over whole datasets.

Public names live here; code lives in underscored modules.
"""

from . import kernels as kernels
from ._api import ntk as ntk
from ._errors import (
    ExecutionError as ExecutionError,
    InputError as InputError,
    ModelError as ModelError,
    NtkdistError as NtkdistError,
    PlanError as PlanError,
    ResumeMismatchError as ResumeMismatchError,
    StoreError as StoreError,
    StoreLockedError as StoreLockedError,
)
from ._model import Model as Model

__version__ = "0.1.0"
from ._compute import compute as compute, open as open, plan as plan
from ._planner import Plan as Plan
from .storage import KernelStore as KernelStore
