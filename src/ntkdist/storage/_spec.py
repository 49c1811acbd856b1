"""The store's job spec: the one typed definition of its root attributes.

A kernel store's root group carries ``attrs["ntkdist"]``, a JSON object
written once by the coordinator before any tile: what was computed (output
form, strategy, dtype, precision, plan), from what (the fingerprint fields and
where the inputs live) and by what (versions, the model's name and spec).
:class:`StoreSpec` is that object. ``StoreSpec.from_json`` reads every store
written so far: keys added later get the value their absence meant, and keys
it does not know are kept, so a newer writer's store round-trips unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, final

from .._outputs import CONVENTIONS
from .._planner import Plan

FORMAT = "ntkdist-kernel-store/1"


@final
@dataclasses.dataclass(frozen=True)
class InputRecord:
    """Where workers read one input, and what it is.

    Attributes:
        root: the Zarr store holding it; ``""`` means the kernel store itself
            (in-memory inputs are copied there).
        path: the array's path inside ``root``.
        shape: its shape, samples first.
        dtype: its dtype's name.
    """

    root: str
    path: str
    shape: tuple[int, ...] = ()
    dtype: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored under ``inputs/<name>``."""
        return {
            "root": self.root,
            "path": self.path,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> InputRecord | None:
        """The record of ``to_json`` (``None`` stays ``None``: symmetric ``x2``)."""
        if data is None:
            return None
        return cls(
            root=str(data.get("root") or ""),
            path=str(data["path"]),
            shape=tuple(int(s) for s in data.get("shape", ())),
            dtype=str(data.get("dtype", "")),
        )


@final
@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """A store's job spec, as written to (and read from) its root attributes.

    Attributes:
        plan: the tile plan the store was created for.
        fields: fingerprint fields, name -> short hash.
        fingerprint: the hash over ``fields``.
        described: fingerprint fields, name -> a short description a reader
            can compare (``trace``, ``float32 [1797, 64]``, params' leaves and
            sum); stores written before it have none (see :meth:`readable`).
        strategy: the strategy's name (``plan.strategy``).
        strategy_repr: the strategy instance's ``repr``.
        precision: the float32 matmul precision of the job; stores written
            before the setting existed computed at JAX's ``"default"``.
        model_spec: the ``file.py:factory`` spec ``verify --repair`` reloads.
        model_name: ``module:qualname`` of the model function.
        inputs: ``{"x1": ..., "x2": ...}``; ``x2`` is ``None`` when symmetric.
        versions: package versions of the writer.
        created: ISO timestamp of creation (UTC).
        extra: keys this version does not know, kept as they were.

    Example:
        >>> p = Plan(n1=3, n2=3, out_dim=1, output="trace", symmetric=True, tile=2,
        ...          strategy="jacobian", dtype="float64")
        >>> s = StoreSpec(plan=p, fields={"x1": "ab"}, fingerprint="f")
        >>> StoreSpec.from_json(s.to_json()) == s
        True
    """

    plan: Plan
    fields: Mapping[str, str]
    fingerprint: str
    described: Mapping[str, str] = dataclasses.field(default_factory=dict)
    strategy: str = ""
    strategy_repr: str = ""
    precision: str = "default"
    model_spec: str | None = None
    model_name: str = ""
    inputs: Mapping[str, InputRecord | None] = dataclasses.field(default_factory=dict)
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    created: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        """Default the strategy's name to the plan's."""
        if not self.strategy:
            object.__setattr__(self, "strategy", self.plan.strategy)

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored as ``attrs["ntkdist"]`` (keys as written since
        the first release; figures of the plan repeated for plain readers)."""
        p = self.plan
        return {
            **self.extra,
            "format": FORMAT,
            "output": p.output,
            "out_dim": p.out_dim,
            "n1": p.n1,
            "n2": p.n2,
            "symmetric": p.symmetric,
            "strategy": self.strategy,
            "strategy_repr": self.strategy_repr,
            "dtype": p.dtype,
            "precision": self.precision,
            "tile": [p.tile_rows, p.tile_cols],
            "fields": dict(self.fields),
            "fingerprint": self.fingerprint,
            "described": dict(self.described),
            "model_spec": self.model_spec,
            "model_name": self.model_name,
            "inputs": {
                k: None if v is None else v.to_json() for k, v in self.inputs.items()
            },
            "versions": dict(self.versions),
            "created": self.created,
            "conventions": CONVENTIONS.get(p.output, ""),
            "plan": json.loads(p.to_json()),
        }

    def readable(self) -> dict[str, str]:
        """Each fingerprint field as a reader can compare it.

        The recorded description where there is one; else what the spec
        itself says (output, strategy, dtype, precision, tile, inputs,
        versions), so stores written before descriptions were recorded read
        the same; else (model, params of such stores) the hash.
        """
        p = self.plan
        known = {
            "output": p.output,
            "strategy": self.strategy_repr or self.strategy,
            "dtype": p.dtype,
            "precision": self.precision,
            "tile": f"{p.tile_rows}x{p.tile_cols}",
            "versions": ", ".join(
                f"{k} {self.versions[k]}"
                for k in ("ntkdist", "jax")
                if k in self.versions
            ),
        }
        for name, record in self.inputs.items():
            known[name] = (
                "symmetric"
                if record is None
                else f"{record.dtype} [{', '.join(str(s) for s in record.shape)}]"
            )
        return {
            k: self.described.get(k) or known.get(k) or v
            for k, v in self.fields.items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreSpec:
        """The spec of a store's ``attrs["ntkdist"]`` (any version written so far)."""
        known = {f.name for f in dataclasses.fields(cls)} | _DERIVED
        return cls(
            plan=Plan.from_json(data["plan"]),
            fields=dict(data.get("fields", {})),
            fingerprint=str(data.get("fingerprint", "")),
            described=dict(data.get("described", {})),
            strategy=str(data.get("strategy", "")),
            strategy_repr=str(data.get("strategy_repr", "")),
            precision=str(data.get("precision", "default")),
            model_spec=data.get("model_spec"),
            model_name=str(data.get("model_name", "")),
            inputs={
                k: InputRecord.from_json(v) for k, v in data.get("inputs", {}).items()
            },
            versions=dict(data.get("versions", {})),
            created=str(data.get("created", "")),
            extra={k: v for k, v in data.items() if k not in known},
        )


# Keys ``to_json`` derives from the plan (read back from it, not stored twice).
_DERIVED = frozenset(
    {"format", "output", "out_dim", "n1", "n2", "symmetric", "dtype", "tile"}
    | {"conventions"}
)
