"""Typed workflow sections: the frozen-dataclass base every section derives from, and the one builder
that turns a YAML mapping into a section (defaults merged, keys and types checked).

Each pipeline step owns the dataclass of its section (``histo.structures.phenotypes.HERules``,
``histo.structures.regions.RegionParams``, ``histo.stats.neighbourhood.NeighbourhoodParams``, …):
every field has a type annotation, its default and a comment with the unit and source.
:func:`histo.workflow.load_workflow` assembles them into one ``Workflow`` through :func:`build`, the
only place that fills in defaults. A field's annotation says what it accepts: ``float`` takes an
int or a float (an int becomes a float), ``int``, ``bool``, ``str`` and ``list`` what they say, a
nested section a mapping; ``X | None`` takes null too. Numbers are finite and ≥ 0 unless the
class's ``RANGES`` says otherwise. A section may define ``validated(path)``, called after it is
built, to check values across fields (one of a set of names, …) and return itself or a completed copy.

This module imports nothing heavy: the CLI loads a workflow before any worker starts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from histo.errors import WorkflowError

S = TypeVar("S", bound="Section")
Number = (int, float)


class Section:
    """Base of the workflow's frozen dataclass sections.

    Read settings by attribute (``wf.neighbourhood.ripley.max_um``). :meth:`as_dict` gives the plain,
    JSON-ready nested dict that run.json records; ``histo.workflow.validate`` turns it back into the
    same Workflow.
    """

    RANGES: ClassVar[dict[str, tuple[float, float]]] = {}  # allowed values (inclusive) of numeric fields

    def as_dict(self) -> dict:
        """The section as nested plain dicts and lists (a deep copy)."""
        return dataclasses.asdict(self)

    def replace(self: S, **changes) -> S:
        """A copy with ``changes`` (field name → value), as :func:`dataclasses.replace`; not re-validated."""
        return dataclasses.replace(self, **changes)


def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _is_section(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint) and issubclass(hint, Section)


def accepted_types(hint) -> tuple[type, ...]:
    """The Python types a field annotated ``hint`` accepts from YAML: ``float`` → int, float;
    ``list[str]`` → list; ``X | None`` → X's and NoneType."""
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    out: list[type] = []
    for arg in args:
        origin = get_origin(arg) or arg
        out += list(Number) if origin is float else [origin]
    return tuple(dict.fromkeys(out))


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else copy.deepcopy(f.default)


def build(cls: type[S], data, where: str = "", path: str = "<workflow>") -> S:
    """The section ``cls`` from a mapping ``data`` (YAML), defaults filled in for missing keys.

    ``where`` is the section's dotted name in the workflow (``""`` for the top level), ``path`` the
    file named in errors. Raises WorkflowError naming the key for a section that is not a mapping,
    an unknown key, a wrong type, a number that is not finite or out of range, a list of numbers
    holding something else, or what the section's ``validated`` refuses.
    """
    if not isinstance(data, dict):
        raise WorkflowError(path, f"'{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    names = _field_names(cls)
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise WorkflowError(path, f"unknown key '{key}' (allowed: {', '.join(sorted(names))})")
    hints = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        hint = hints[f.name]
        if _is_section(hint):
            values[f.name] = build(hint, data.get(f.name, {}) or {}, name, path)
            continue
        accepted, default = accepted_types(hint), _default(f)
        value = copy.deepcopy(data[f.name]) if f.name in data else default
        if value is not None and (
            not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted)
        ):
            raise WorkflowError(path, f"'{name}' has the wrong type: {value!r} ({type(value).__name__})")
        _check_numbers(value, default, name, path, cls.RANGES.get(f.name, (0.0, math.inf)))
        is_int = isinstance(value, int) and not isinstance(value, bool)
        values[f.name] = float(value) if float in accepted and is_int else value
    out = cls(**values)
    return out.validated(path) if hasattr(out, "validated") else out


def _check_numbers(value, default, name: str, path: str, bounds: tuple[float, float]) -> None:
    """A number (or each number of a list) is finite and within ``bounds``; a list whose default
    holds numbers holds only numbers."""
    lo, hi = bounds
    numeric = isinstance(default, list) and default and all(isinstance(x, Number) for x in default)
    for x in value if isinstance(value, list) else [value]:
        if not isinstance(x, Number) or isinstance(x, bool):
            if numeric:
                raise WorkflowError(path, f"'{name}' must hold numbers, not {x!r}")
            continue
        if not math.isfinite(x):
            raise WorkflowError(path, f"'{name}' must be a finite number, not {x!r}")
        if not lo <= x <= hi:
            allowed = f"{lo:g}–{hi:g}" if hi < math.inf else f"≥ {lo:g}"
            raise WorkflowError(path, f"'{name}' must be {allowed}, not {x!r}")


def schema(cls: type[Section]) -> dict[str, Any]:
    """The section's keys as ``key -> (accepted types, default)``, nested sections as dicts (the
    format of the former ``histo.workflow.SCHEMA``; for tests that walk every key)."""
    hints = get_type_hints(cls)
    return {
        f.name: schema(hints[f.name]) if _is_section(hints[f.name]) else (accepted_types(hints[f.name]), _default(f))
        for f in dataclasses.fields(cls)
    }


def ranges(cls: type[Section], where: str = "") -> dict[str, tuple[float, float]]:
    """Every numeric range of ``cls`` and its nested sections, by dotted key."""
    hints = get_type_hints(cls)
    out = {f"{where}{key}": bounds for key, bounds in cls.RANGES.items()}
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            out |= ranges(hints[f.name], f"{where}{f.name}.")
    return out
