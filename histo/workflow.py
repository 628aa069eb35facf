"""Workflow presets: YAML files in ``workflows/`` loaded into one frozen, typed :class:`Workflow`.

A preset names the tissue, the stain, the nucleus model and the parameters of each step, all in
µm (or µm²), and states only what differs from the defaults (``workflows/reference.yaml`` lists
every key with its default). Each step owns the dataclass of its section: ``segmentation`` in
:mod:`histo.segment.tiling`, ``tissue`` in :mod:`histo.segment.tissue`, ``cell_types`` and
``marker_gates`` in :mod:`histo.structures.phenotypes`,
``regions`` in :mod:`histo.structures.regions`, ``neighbourhood`` in :mod:`histo.stats.neighbourhood`,
``endpoints`` in :mod:`histo.stats.endpoints`. :func:`histo.config.build` fills in the defaults and
checks every key: unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from histo.config import Section, build, ranges, schema
from histo.errors import SlideError, WorkflowError
from histo.segment.nucleus_classes import CLASSES as NUCLEUS_CLASSES
from histo.segment.tiling import Segmentation
from histo.segment.tissue import TissueParams
from histo.stats.endpoints import Endpoints
from histo.stats.neighbourhood import NeighbourhoodParams
from histo.structures.phenotypes import HE_TYPES, HERules, MarkerGates
from histo.structures.regions import STRUCTURES, TISSUE_TYPES, RegionParams, region_params, used_cell_types

WORKFLOW_DIR = Path(__file__).resolve().parents[1] / "workflows"
STAINS = ("he", "ihc", "if")
REFERENCE = "reference"  # workflows/reference.yaml: every key with its default and comment, not a preset


@dataclass(frozen=True)
class Workflow(Section):
    """A validated workflow: the tissue, the stain, the nucleus model and each step's section.

    Built by :func:`load_workflow` / :func:`validate` (never by hand in the pipeline); every section
    is a frozen dataclass owned by its step. ``as_dict()`` is what run.json records.
    """

    name: str | None = None  # the preset's name; load_workflow: the file's stem where unset
    description: str = ""
    tissue_type: str = "lymph-node"  # lymph-node | synovium
    stain: str = "he"  # he | ihc | if
    model: str | None = None  # None = the stain's default model
    segmentation: Segmentation = field(default_factory=Segmentation)
    tissue: TissueParams = field(default_factory=TissueParams)
    cell_types: HERules = field(default_factory=HERules)  # H&E typing rules (histo.structures.phenotypes)
    regions: RegionParams = field(default_factory=RegionParams)  # follicles, aggregates, germinal centres, lining
    #   (histo.structures.regions)
    marker_gates: MarkerGates = field(default_factory=MarkerGates)  # IHC / immunofluorescence: first positive
    #   gate wins (histo.structures.phenotypes)
    neighbourhood: NeighbourhoodParams = field(default_factory=NeighbourhoodParams)  # Squidpy statistics per slide
    #   and per region (histo.stats.neighbourhood)
    endpoints: Endpoints = field(default_factory=Endpoints)  # the cohort report's endpoints (histo.stats.endpoints)

    def validated(self, path: str) -> Workflow:
        """Itself, after the checks across sections: a known stain and tissue type, and structures
        whose cell types this workflow gives."""
        if self.stain not in STAINS:
            raise WorkflowError(path, f"'stain' must be one of {', '.join(STAINS)}, got {self.stain!r}")
        if self.tissue_type not in TISSUE_TYPES:
            raise WorkflowError(
                path, f"'tissue_type' must be one of {', '.join(TISSUE_TYPES)}, got {self.tissue_type!r}"
            )
        _check_structures(self, path)
        _check_learned_classes(self, path)
        return self


# key -> (accepted types, default), nested dicts for sections: derived from the dataclasses (tests walk it)
SCHEMA: dict[str, Any] = schema(Workflow)
# Allowed values (inclusive) of numeric keys, by dotted name (each section's RANGES); every other number,
# alone or in a list, must be finite and ≥ 0. A negative halo silently lost nuclei; NaN ended in a traceback.
RANGES: dict[str, tuple[float, float]] = ranges(Workflow)


def validate(data: dict, path: str = "<workflow>") -> Workflow:
    """The :class:`Workflow` of a mapping (a parsed YAML preset), defaults filled in.

    Raises WorkflowError naming ``path`` and the key: unknown keys, wrong types, numbers out of
    range, unknown stain, tissue type, structures or cell types, malformed gates or endpoints.
    """
    return build(Workflow, data or {}, "", path)


def _check_learned_classes(wf: Workflow, path: str) -> None:
    """WorkflowError naming the key where ``cell_types`` names a class the nucleus classifier does not give."""
    for key in ("large_classes", "lymphocyte_classes"):
        unknown = sorted(set(getattr(wf.cell_types, key)) - set(NUCLEUS_CLASSES))
        if unknown:
            raise WorkflowError(
                path, f"'cell_types.{key}': unknown class(es) {unknown}; classes: {list(NUCLEUS_CLASSES)}"
            )


def cell_type_names(wf: Workflow) -> list[str]:
    """The cell types a validated workflow can give: the H&E rules' (stain "he"), else its gates'
    cell types and "other"."""
    if wf.stain == "he":
        return list(HE_TYPES)
    return list(dict.fromkeys([g["cell_type"] for g in wf.marker_gates.gates] + ["other"]))


def _check_structures(wf: Workflow, path: str) -> None:
    """``regions.structures`` names known structures; each ``regions.<section>.cell_types`` list that
    the wanted structures read names only cell types this workflow gives, and at least one where
    that section is itself a wanted structure."""
    unknown = [s for s in wf.regions.structures or [] if s not in STRUCTURES]
    if unknown:
        raise WorkflowError(
            path, f"'regions.structures': unknown structure {unknown[0]!r} (known: {', '.join(STRUCTURES)})"
        )
    names = cell_type_names(wf)
    params = region_params(wf.tissue_type, wf.regions)
    for section, types in used_cell_types(params, wf.tissue_type).items():
        key = f"regions.{section}.cell_types"
        bad = [t for t in types if t not in names]
        if bad:
            hint = "" if wf.stain == "he" or wf.marker_gates.gates else "; add 'marker_gates'"
            raise WorkflowError(
                path,
                f"'{key}': {bad[0]!r} is not a cell type of this workflow "
                f"(stain {wf.stain!r} gives: {', '.join(names)}{hint})",
            )
        if not types and section in params.structures:
            raise WorkflowError(
                path,
                f"'{key}' is empty: name the cell types that form {section}s "
                f"(stain {wf.stain!r} gives: {', '.join(names)})",
            )


def nucleus_channel(wf: Workflow, channel_names: list[str], slide: str) -> int:
    """Index of the channel of a fluorescence ``slide`` (its ``channel_names``) that a one-channel
    nucleus model reads: ``segmentation.nucleus_channel`` of the validated workflow ``wf`` (a name
    or a 0-based index), else 0. SlideError naming the slide and its channels when it has no such
    channel."""
    want = wf.segmentation.nucleus_channel
    index = (
        0
        if want is None
        else want
        if isinstance(want, int)
        else channel_names.index(want)
        if want in channel_names
        else -1
    )
    if not 0 <= index < len(channel_names):
        raise SlideError(
            slide,
            f"no channel {want!r} for the nuclei (workflow {wf.name!r}, "
            f"'segmentation.nucleus_channel'); the slide's channels: {', '.join(channel_names)}",
        )
    return index


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases: a few hundred bytes of nested ``*refs`` expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(
                f"YAML aliases (*{self.peek_event().anchor}) are not allowed "
                f"(line {mark.line + 1}); write the values out"
            )
        return super().compose_node(parent, index)


def load_workflow(name_or_path: str | Path | None) -> Workflow:
    """Load and validate a workflow preset.

    Parameters
    ----------
    name_or_path : str or pathlib.Path or None
        A preset name (``workflows/NAME.yaml``: ``lymph-node-he``, ``synovium-he``,
        ``lymph-node-if``), or the path of a YAML file; None gives the defaults (name ``default``).
        A preset states only what differs from the defaults; ``workflows/reference.yaml`` lists
        every key with its default, unit and source.

    Returns
    -------
    Workflow
        The frozen, validated workflow: every key filled in, numbers as floats where the key takes
        µm, µm², µm/px or ratios; ``name`` is the file's stem where the file does not set one.

    Raises
    ------
    WorkflowError
        Naming the file and the problem: no such preset or file, invalid YAML (aliases included),
        an unknown key or a wrong type (naming the key), a number out of range, an unknown stain,
        tissue type, structure, region kind or cell type, a malformed gate or endpoint.
    """
    if name_or_path is None:
        return validate({"name": "default"}, "<defaults>")
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = WORKFLOW_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_workflows())
        raise WorkflowError(name_or_path, f"no such workflow file or preset (presets: {known})")
    try:
        data = _NoAliasLoader(path.read_text()).get_single_data()
    except yaml.YAMLError as exc:
        raise WorkflowError(path, f"not valid YAML: {str(exc).splitlines()[0]}") from None
    wf = validate(data, str(path))
    return wf if wf.name else wf.replace(name=path.stem)


def as_workflow(workflow: str | Path | Workflow | dict | None) -> Workflow:
    """``workflow`` as a :class:`Workflow`: itself, a mapping validated (:func:`validate`), else a
    preset name or YAML path loaded (:func:`load_workflow`; None: the defaults)."""
    if isinstance(workflow, Workflow):
        return workflow
    if isinstance(workflow, dict):
        return validate(workflow)
    return load_workflow(workflow)


def list_workflows() -> list[str]:
    """Names of the presets shipped in ``workflows/`` (not ``reference``: the defaults, documented)."""
    return sorted(p.stem for p in WORKFLOW_DIR.glob("*.yaml") if p.stem != REFERENCE)
