"""KernelRidgeRegressor: kernel ridge regression as a scikit-learn estimator."""

from __future__ import annotations

from typing import Any, final

import numpy as np

from .._errors import KernelInputError
from ._ridge import KernelRidgeSolution, kernel_ridge, r2_score


@final
class KernelRidgeRegressor:
    """A scikit-learn estimator for kernel ridge regression on precomputed NTKs.

    ``fit(K_train_train, y)``, ``predict(K_test_train)`` and
    ``score(K_test_train, y)`` (R², averaged over label columns as
    scikit-learn's ``r2_score``) take kernels as numpy arrays, zarr arrays or
    stores; it declares the ``pairwise`` tag, so scikit-learn's model
    selection slices precomputed kernels correctly.

    Args:
        ridge: ``λ > 0``, added to the kernel's diagonal.
        method: see :func:`kernel_ridge`.
        memory_budget: see :func:`kernel_ridge`.
        tol: see :func:`kernel_ridge`.
        maxiter: see :func:`kernel_ridge`.
        preconditioner: see :func:`kernel_ridge`.
        rank: see :func:`kernel_ridge`.
        allow_incomplete: see :func:`kernel_ridge`.

    Example:
        >>> import numpy as np
        >>> k = np.array([[2.0, 1.0], [1.0, 2.0]])
        >>> KernelRidgeRegressor(ridge=1.0).fit(k, [1.0, -1.0]).predict(k).round(3)
        array([ 0.5, -0.5])
    """

    def __init__(
        self,
        ridge: float = 1.0,
        *,
        method: str = "auto",
        memory_budget: int | str | None = None,
        tol: float = 1e-6,
        maxiter: int = 1000,
        preconditioner: str = "nystrom",
        rank: int = 300,
        allow_incomplete: bool = False,
    ) -> None:
        self.ridge = ridge
        self.method = method
        self.memory_budget = memory_budget
        self.tol = tol
        self.maxiter = maxiter
        self.preconditioner = preconditioner
        self.rank = rank
        self.allow_incomplete = allow_incomplete

    _PARAMS = (
        "ridge",
        "method",
        "memory_budget",
        "tol",
        "maxiter",
        "preconditioner",
        "rank",
        "allow_incomplete",
    )

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments (scikit-learn protocol)."""
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params: Any) -> KernelRidgeRegressor:
        """Set constructor arguments (scikit-learn protocol)."""
        for name, value in params.items():
            if name not in self._PARAMS:
                raise KernelInputError(
                    f"{name!r} is not a parameter of KernelRidgeRegressor; expected "
                    f"one of {list(self._PARAMS)}."
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        """Show the parameters."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"KernelRidgeRegressor({args})"

    def __sklearn_tags__(self) -> Any:
        """Tags for scikit-learn: a regressor on a precomputed (pairwise) kernel."""
        from sklearn.utils import InputTags, RegressorTags, Tags, TargetTags

        return Tags(
            estimator_type="regressor",
            target_tags=TargetTags(required=True),
            regressor_tags=RegressorTags(),
            input_tags=InputTags(pairwise=True),
        )

    def fit(self, k_train_train: Any, y: Any) -> KernelRidgeRegressor:
        """Fit on the ``N × N`` training kernel and labels ``[N]`` or ``[N, C]``."""
        self.y_ndim_ = np.ndim(y)
        self.solution_: KernelRidgeSolution | None = kernel_ridge(
            k_train_train,
            y,
            self.ridge,
            method=self.method,
            memory_budget=self.memory_budget,
            tol=self.tol,
            maxiter=self.maxiter,
            preconditioner=self.preconditioner,
            rank=self.rank,
            allow_incomplete=self.allow_incomplete,
        )
        self.dual_coef_ = self.solution_.coef[0]
        return self

    def predict(self, k_test_train: Any) -> np.ndarray:
        """Predictions ``[M]`` or ``[M, C]`` (the shape of the training labels)."""
        solution = getattr(self, "solution_", None)
        if solution is None:
            raise KernelInputError(
                "KernelRidgeRegressor is not fitted; call fit first."
            )
        pred = solution.predict(k_test_train, allow_incomplete=self.allow_incomplete)[0]
        return pred[:, 0] if self.y_ndim_ == 1 else pred

    def score(self, k_test_train: Any, y: Any, sample_weight: Any = None) -> float:
        """R² of the predictions, averaged uniformly over label columns."""
        return r2_score(y, self.predict(k_test_train), sample_weight)
