"""The plan of a compile as rows and a printable table (``qcompile.explain`` and the backend log)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from qcompile.dtypes import dtype_name
from qcompile.formats import Scheme
from qcompile.memory import MemoryFootprint
from qcompile.passes.plan import SitePlan


def describe_scheme(scheme: Scheme) -> str:
    """Short text for a scheme: its kind and the settings that differ from the defaults."""
    defaults = type(scheme)()
    parts = [scheme.kind]
    for field in dataclasses.fields(scheme):
        value = getattr(scheme, field.name)
        if value != getattr(defaults, field.name):
            shown = dtype_name(value) if hasattr(value, "is_floating_point") else value
            parts.append(f"{field.name}={shown}")
    return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One linear site of one graph."""

    graph: str  # dynamo's id of the graph ("frame/recompile"); graph breaks and recompiles give several
    module: str  # the module's name as named_modules() gives it; "<node>" when it could not be resolved
    form: str
    shape: tuple[int, ...]
    dtype: str
    scheme: str | None
    bytes_before: int
    bytes_after: int  # equal to bytes_before when skipped
    skip_reason: str | None
    shared: bool  # a site whose weight another row already counted (tied or repeated)
    aliases: tuple[str, ...] = ()  # other module names holding the same weight (a tied head's embedding)
    release: str | None = None  # with release_weights: "released ..." or "kept: <why>"

    @property
    def quantized(self) -> bool:
        return self.scheme is not None


def rows_for(
    plans: Sequence[SitePlan], graph: str, seen_weights: set[int], release_notes: Mapping[int, str] | None = None
) -> list[PlanRow]:
    """Rows for one graph's plans. ``seen_weights`` (ids of parameters) dedups shared weights across rows;
    ``release_notes`` maps ``id(plan)`` to what release_weights did with its weight."""
    rows = []
    for plan in plans:
        site = plan.site
        numel = site.shape[0] * site.shape[1] if len(site.shape) == 2 else 0
        itemsize = site.dtype.itemsize if site.dtype is not None else 0
        before = numel * itemsize
        after = plan.scheme.packed_nbytes(site.shape) if plan.scheme is not None else before
        key = id(site.parameter) if site.parameter is not None else None
        shared = key is not None and key in seen_weights
        if key is not None:
            seen_weights.add(key)
        module_names = site.module_names
        rows.append(PlanRow(
            graph=graph,
            module=module_names[0] if module_names else f"<{site.node.name}>",
            form=site.form,
            shape=tuple(site.shape),
            dtype=dtype_name(site.dtype) if site.dtype is not None else "?",
            scheme=describe_scheme(plan.scheme) if plan.scheme is not None else None,
            bytes_before=before,
            bytes_after=after,
            skip_reason=plan.skip_reason,
            shared=shared,
            aliases=module_names[1:],
            release=(release_notes or {}).get(id(plan)),
        ))
    return rows


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The plan of every linear site qcompile saw; ``str(plan)`` is a table."""

    rows: tuple[PlanRow, ...]
    pass_seconds: float = 0.0  # time qcompile's passes took (finding, planning, packing, rewriting)
    # What the graph's model held when the plan was made (packed forms included; qcompile/memory.py).
    # With release_weights the float copies go after the first call: see qcompile.memory_footprint(model).
    footprint: MemoryFootprint | None = None

    @property
    def quantized(self) -> tuple[PlanRow, ...]:
        return tuple(r for r in self.rows if r.quantized)

    @property
    def skipped(self) -> tuple[PlanRow, ...]:
        return tuple(r for r in self.rows if not r.quantized)

    def _unique(self) -> Iterable[PlanRow]:
        return (r for r in self.rows if not r.shared)

    @property
    def bytes_before(self) -> int:
        """Weight bytes of all linear layers before quantization (shared weights counted once)."""
        return sum(r.bytes_before for r in self._unique())

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self._unique())

    def table(self) -> str:
        header = ("graph", "module", "shape", "dtype", "scheme / skip reason", "before", "after")
        lines = [header]
        for r in self.rows:
            what = r.scheme if r.quantized else f"skip: {r.skip_reason}"
            if r.release:
                what += f"; {r.release}"
            shape = "x".join(map(str, r.shape))
            after = _size(r.bytes_after) + (" (shared)" if r.shared else "")
            module = r.module + (f" (= {', '.join(r.aliases)})" if r.aliases else "")
            lines.append((str(r.graph), module, shape, r.dtype, what, _size(r.bytes_before), after))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        out.append(
            f"{len(self.quantized)} of {len(self.rows)} linear sites quantized; linear weights "
            f"{_size(self.bytes_before)} -> {_size(self.bytes_after)} ({ratio:.2f}x smaller)"
        )
        if self.footprint is not None:
            out.append(f"model holds {self.footprint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()
