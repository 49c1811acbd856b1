"""Consumers of stored kernels: kernel ridge regression, NTK-GP prediction, spectrum.

Every function takes kernels as numpy arrays, ``zarr.Array`` objects or stores
from ``ntkdist.open`` and reads stores tile by tile along their chunk grid, so
kernels larger than memory are solved by streaming (conjugate gradient, Lanczos)
and small ones in memory (Cholesky, eigendecomposition). Arithmetic is float64.

- :func:`kernel_ridge` / :class:`KernelRidgeRegressor`: kernel ridge regression
  for several ridge values at once (conventions in :mod:`ntkdist.regression._ridge`).
- :func:`gradient_descent_mse`: linearised-network predictions at training time
  ``t`` and their NTK-GP variance (conventions in :mod:`ntkdist.regression._predict`).
- :func:`spectrum` / :func:`plot_spectrum`: top eigenvalues, the smallest one and
  the condition number (:mod:`ntkdist.regression._spectrum`).
"""

from .._errors import (
    FingerprintMismatchError as FingerprintMismatchError,
    IncompleteKernelError as IncompleteKernelError,
    KernelInputError as KernelInputError,
    SolverError as SolverError,
)
from ._estimator import KernelRidgeRegressor as KernelRidgeRegressor
from ._predict import (
    GpPrediction as GpPrediction,
    MsePredictor as MsePredictor,
    gradient_descent_mse as gradient_descent_mse,
)
from ._ridge import (
    KernelRidgeSolution as KernelRidgeSolution,
    kernel_ridge as kernel_ridge,
    metrics as metrics,
    r2_score as r2_score,
)
from ._source import as_kernel as as_kernel
from ._spectrum import (
    Spectrum as Spectrum,
    plot_spectrum as plot_spectrum,
    spectrum as spectrum,
)
