"""How one tile of the kernel is computed: strategies and output forms."""

from ._base import (
    OUTPUTS as OUTPUTS,
    AbstractKernelStrategy as AbstractKernelStrategy,
    Cost as Cost,
    tile_shape as tile_shape,
)
from ._choose import (
    STRATEGIES as STRATEGIES,
    choose as choose,
    get as get,
    rank as rank,
)
from ._jacobian import JacobianContraction as JacobianContraction
from ._structured import StructuredDerivatives as StructuredDerivatives
from ._support import check_supported as check_supported
from ._vector_products import NtkVectorProducts as NtkVectorProducts
