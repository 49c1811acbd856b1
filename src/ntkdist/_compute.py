"""Former home of ``compute``; its parts now live in one module per stage.

Kept so that imports of the old path keep working: :mod:`ntkdist._api` (the
entry points), :mod:`ntkdist._job`, :mod:`ntkdist._planning`, :mod:`ntkdist._run`.
"""

from ._api import compute as compute, open as open, plan as plan, repair as repair
from ._job import (
    NOMINAL_TILE as NOMINAL_TILE,
    Job as Job,
    prepare as prepare,
    with_strategy as with_strategy,
)
from ._planning import (
    cost_model as cost_model,
    measure_rate as measure_rate,
    plan_job as plan_job,
)
