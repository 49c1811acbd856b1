"""ntkdist: the finite-width empirical NTK over whole datasets.

Public names live here; code lives in underscored modules.
"""

from . import kernels as kernels, regression as regression
from ._api import compute as compute, ntk as ntk, open as open, plan as plan
from ._errors import (
    ExecutionError as ExecutionError,
    InputError as InputError,
    LockLostError as LockLostError,
    ModelError as ModelError,
    NtkdistError as NtkdistError,
    PlanError as PlanError,
    ResumeMismatchError as ResumeMismatchError,
    StoreError as StoreError,
    StoreLockedError as StoreLockedError,
    StoreWriteError as StoreWriteError,
)
from ._model import Model as Model
from ._ntk_fn import ntk_fn as ntk_fn
from ._planner import Plan as Plan
from ._version import __version__ as __version__
from .regression import (
    FingerprintMismatchError as FingerprintMismatchError,
    GpPrediction as GpPrediction,
    IncompleteKernelError as IncompleteKernelError,
    KernelInputError as KernelInputError,
    KernelRidgeRegressor as KernelRidgeRegressor,
    KernelRidgeSolution as KernelRidgeSolution,
    MsePredictor as MsePredictor,
    SolverError as SolverError,
    Spectrum as Spectrum,
    gradient_descent_mse as gradient_descent_mse,
    kernel_ridge as kernel_ridge,
    plot_spectrum as plot_spectrum,
    spectrum as spectrum,
)
from .storage import KernelStore as KernelStore
