"""The four output forms' shapes, mirrors and formulas, in one table (pure Python).

For ``Θ[i, j, a, b] = <∂f_a(x1_i)/∂θ, ∂f_b(x2_j)/∂θ>`` (see
:mod:`ntkdist.kernels._base` for each form's definition): ``full`` keeps both
output axes, ``diagonal`` one, ``trace`` and ``pntk`` none.
"""

from __future__ import annotations

OUTPUTS: tuple[str, ...] = ("full", "trace", "diagonal", "pntk")

# Output axes each form keeps after the two sample axes.
OUTPUT_AXES = {"full": 2, "trace": 0, "diagonal": 1, "pntk": 0}

# What each form holds, recorded in every store for its readers.
CONVENTIONS = {
    "full": "K[i,j,a,b] = <df_a(x1_i)/dθ, df_b(x2_j)/dθ>",
    "trace": "K[i,j] = (1/O) Σ_a full[i,j,a,a]",
    "diagonal": "K[i,j,a] = full[i,j,a,a]",
    "pntk": "K[i,j] = (1/O) Σ_a Σ_b full[i,j,a,b]",
}


def kernel_shape(output: str, n1: int, n2: int, out_dim: int) -> tuple[int, ...]:
    """Shape of a kernel (or tile) of ``output`` form.

    Example:
        >>> kernel_shape("diagonal", 5, 4, 3)
        (5, 4, 3)
    """
    return (n1, n2, *(out_dim,) * OUTPUT_AXES[output])


def mirror_axes(output: str) -> tuple[int, ...]:
    """Axes that turn block ``(i, j)`` into block ``(j, i)``.

    Example:
        >>> mirror_axes("full")
        (1, 0, 3, 2)
    """
    return (1, 0, *reversed(range(2, 2 + OUTPUT_AXES[output])))
