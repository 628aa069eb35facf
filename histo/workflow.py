"""Workflow presets: YAML files in ``workflows/`` validated against a typed schema.

A preset names the tissue, the stain, the nucleus model and the parameters of each step, all in
µm (or µm²). Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from histo.errors import SlideError, WorkflowError
from histo.stats.endpoints import NEVER, check_endpoints
from histo.structures.phenotypes import HE_RULES_SCHEMA, HE_TYPES, check_gates
from histo.structures.regions import REGION_PARAMS_SCHEMA, STRUCTURES, TISSUE_TYPES, region_params, used_cell_types

WORKFLOW_DIR = Path(__file__).resolve().parents[1] / "workflows"

Number = (int, float)

# key -> (accepted types, default). Nested dicts are sections. None default = "not set".
SCHEMA: dict[str, Any] = {
    "name": (str, None),
    "description": (str, ""),
    "tissue_type": (str, "lymph-node"),  # lymph-node | synovium
    "stain": (str, "he"),  # he | ihc | if
    "model": ((str, type(None)), None),  # None = the stain's default model
    "segmentation": {
        "tile_um": (Number, 256.0),  # tile core edge, µm (1024 px at 0.25 µm/px)
        "halo_um": ((*Number, type(None)), None),  # None = from the model's largest nucleus
        "prob_thresh": ((*Number, type(None)), None),  # None = the model's own threshold
        "nms_thresh": ((*Number, type(None)), None),
        "nucleus_channel": ((str, int, type(None)), None),  # fluorescence: the channel the nucleus model reads
        #   (name or 0-based index); None = the first channel, the DNA stain as tissue detection assumes
    },
    "tissue": {
        "mpp": (Number, 8.0),  # µm/px of the level tissue is detected on
        "min_area_um2": (Number, 20_000.0),  # smaller tissue specks are dropped
    },
    "cell_types": HE_RULES_SCHEMA,
    "regions": REGION_PARAMS_SCHEMA,  # follicles, aggregates, germinal centres, lining (histo.structures.regions)
    "marker_gates": {  # IHC / immunofluorescence: first positive gate wins (histo.structures.phenotypes)
        "gates": (list, []),  # [{marker, cell_type, threshold: number | auto, column}]
        "auto": ((str, type(None)), "otsu"),  # per-slide threshold method for "auto" gates: otsu | gmm
    },
    "neighbourhood": {  # Squidpy statistics per slide and per region (histo.stats.neighbourhood)
        "run": (bool, True),
        "graph": (str, "delaunay"),  # delaunay: its edges ≤ max_edge_um | radius: all pairs ≤ max_edge_um
        "max_edge_um": (Number, 30.0),  # µm; cuts Delaunay edges across gaps and tissue pieces
        "kinds": (list, ["tissue", "follicle", "aggregate", "annotation"]),  # region kinds analysed, besides the slide
        "min_cells": (int, 50),  # regions with fewer cells are skipped
        "seed": (int, 0),  # permutations, samples and simulations
        "nhood_enrichment": {"run": (bool, True), "n_perms": (int, 100)},
        "interaction_matrix": {"run": (bool, True)},
        "centrality_scores": {"run": (bool, True), "max_cells": (int, 200_000)},  # larger regions skipped (NaN)
        "co_occurrence": {
            "run": (bool, True),
            "max_um": (Number, 200.0),
            "step_um": (Number, 10.0),
            "max_cells": (int, 20_000),
        },  # seeded sample of ≤ max_cells per region
        "ripley": {
            "run": (bool, True),
            "max_um": (Number, 100.0),
            "n_steps": (int, 21),
            "max_cells": (int, 10_000),
        },  # L function; memory ≈ (n²/2)·(8 + n_steps) bytes for n cells of one type
        "moran": {"run": (bool, True), "features": (list, ["area_um2", "hematoxylin_od", "eccentricity"])},
    },
    "endpoints": {  # the cohort report's endpoints (histo.stats.endpoints: items, units, pooling over slides)
        "primary": (list, []),  # [{metric, unit, label, pool, region, column}]: one test family
        "exploratory": (list, []),  # declared exploratory endpoints: the second family
        "rest": (bool, True),  # every other numeric slide metric is exploratory too (unit from its name)
        "never": (list, NEVER),  # glob patterns of metrics never tested (sampling sizes, counts)
    },
}

STAINS = ("he", "ihc", "if")

# Allowed values (inclusive) of numeric keys, by dotted name; every other number, alone or in a list,
# must be finite and ≥ 0. A negative halo silently lost nuclei; NaN ended in a traceback.
RANGES: dict[str, tuple[float, float]] = {
    "segmentation.tile_um": (32.0, 2048.0),  # 128–8192 px at 0.25 µm/px
    "segmentation.halo_um": (0.0, 256.0),
    "segmentation.prob_thresh": (0.0, 1.0),
    "segmentation.nms_thresh": (0.0, 1.0),
    "tissue.mpp": (0.5, 100.0),
    "cell_types.lymphocyte_max_eccentricity": (0.0, 1.0),
    "cell_types.lymphocyte_min_solidity": (0.0, 1.0),
    "cell_types.stromal_min_eccentricity": (0.0, 1.0),
    "cell_types.dense_fraction": (1e-4, 1.0),
    "regions.grid_um": (0.5, 100.0),
    "regions.follicle.min_cell_fraction": (0.0, 1.0),
    "regions.follicle.min_dense_fraction": (0.0, 1.0),
    "regions.germinal_centre.min_large_fraction": (0.0, 1.0),
    "regions.germinal_centre.edge_large_fraction": (0.0, 1.0),
    "regions.germinal_centre.min_inside_fraction": (0.0, 1.0),
    "regions.aggregate.min_samples": (1, 1e6),
    "regions.lining.segment_um": (1.0, 1e4),
    "regions.lining.bin_um": (0.1, 100.0),
    "regions.scores.lymphoid_area_fraction": (0.0, 1.0),
    "neighbourhood.max_edge_um": (0.1, 1e4),
    "neighbourhood.nhood_enrichment.n_perms": (1, 100_000),
    "neighbourhood.co_occurrence.max_um": (0.1, 1e4),
    "neighbourhood.co_occurrence.step_um": (0.1, 1e4),
    "neighbourhood.co_occurrence.max_cells": (2, 200_000),
    "neighbourhood.ripley.max_um": (0.1, 1e4),
    "neighbourhood.ripley.n_steps": (2, 1000),
    "neighbourhood.ripley.max_cells": (2, 100_000),
}


def check_section(section: dict, schema: dict, where: str, path: str) -> dict:
    """Return ``section`` merged over the schema defaults; raise on unknown keys or types."""
    if not isinstance(section, dict):
        raise WorkflowError(path, f"'{where or 'top level'}' must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise WorkflowError(path, f"unknown key '{key}' (allowed: {', '.join(sorted(schema))})")
    out = {}
    for key, spec in schema.items():
        name = f"{where}.{key}" if where else key
        if isinstance(spec, dict):
            out[key] = check_section(section.get(key, {}) or {}, spec, name, path)
            continue
        types, default = spec
        value = section.get(key, default)
        types = types if isinstance(types, tuple) else (types,)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise WorkflowError(path, f"'{name}' has the wrong type: {value!r} ({type(value).__name__})")
        _check_numbers(value, default, name, path)
        out[key] = float(value) if float in types and isinstance(value, int) and not isinstance(value, bool) else value
    return out


def _check_numbers(value, default, name: str, path: str) -> None:
    """A number (or each number of a list) is finite and within RANGES[name], else ≥ 0; a list whose
    default holds numbers holds only numbers."""
    lo, hi = RANGES.get(name, (0.0, math.inf))
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


def validate(data: dict, path: str = "<workflow>") -> dict:
    """Validate a workflow mapping and fill in defaults; returns a new dict."""
    wf = check_section(copy.deepcopy(data or {}), SCHEMA, "", path)
    if wf["stain"] not in STAINS:
        raise WorkflowError(path, f"'stain' must be one of {', '.join(STAINS)}, got {wf['stain']!r}")
    if wf["tissue_type"] not in TISSUE_TYPES:
        raise WorkflowError(path, f"'tissue_type' must be one of {', '.join(TISSUE_TYPES)}, got {wf['tissue_type']!r}")
    try:
        check_gates(wf["marker_gates"]["gates"], wf["marker_gates"]["auto"])
    except ValueError as exc:
        raise WorkflowError(path, f"'marker_gates': {exc}") from None
    _check_structures(wf, path)
    wf["endpoints"] = check_endpoints(wf["endpoints"], path)
    return wf


def cell_type_names(wf: dict) -> list[str]:
    """The cell types a validated workflow can give: the H&E rules' (stain "he"), else its gates'
    cell types and "other"."""
    if wf["stain"] == "he":
        return list(HE_TYPES)
    return list(dict.fromkeys([g["cell_type"] for g in wf["marker_gates"]["gates"]] + ["other"]))


def _check_structures(wf: dict, path: str) -> None:
    """``regions.structures`` names known structures; each ``regions.<section>.cell_types`` list that
    the wanted structures read names only cell types this workflow gives, and at least one where
    that section is itself a wanted structure."""
    unknown = [s for s in wf["regions"]["structures"] or [] if s not in STRUCTURES]
    if unknown:
        raise WorkflowError(
            path, f"'regions.structures': unknown structure {unknown[0]!r} (known: {', '.join(STRUCTURES)})"
        )
    names = cell_type_names(wf)
    params = region_params(wf["tissue_type"], wf["regions"])
    for section, types in used_cell_types(params, wf["tissue_type"]).items():
        key = f"regions.{section}.cell_types"
        bad = [t for t in types if t not in names]
        if bad:
            hint = "" if wf["stain"] == "he" or wf["marker_gates"]["gates"] else "; add 'marker_gates'"
            raise WorkflowError(
                path,
                f"'{key}': {bad[0]!r} is not a cell type of this workflow "
                f"(stain {wf['stain']!r} gives: {', '.join(names)}{hint})",
            )
        if not types and section in params["structures"]:
            raise WorkflowError(
                path,
                f"'{key}' is empty: name the cell types that form {section}s "
                f"(stain {wf['stain']!r} gives: {', '.join(names)})",
            )


def nucleus_channel(wf: dict, channel_names: list[str], slide: str) -> int:
    """Index of the channel of a fluorescence ``slide`` (its ``channel_names``) that a one-channel
    nucleus model reads: ``segmentation.nucleus_channel`` of the validated workflow ``wf`` (a name
    or a 0-based index), else 0. SlideError naming the slide and its channels when it has no such
    channel."""
    want = wf["segmentation"]["nucleus_channel"]
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
            f"no channel {want!r} for the nuclei (workflow {wf['name']!r}, "
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


def load_workflow(name_or_path: str | Path | None) -> dict:
    """Load a preset by name (``workflows/NAME.yaml``) or by path; ``None`` gives the defaults."""
    if name_or_path is None:
        return validate({"name": "default"}, "<defaults>")
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = WORKFLOW_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in WORKFLOW_DIR.glob("*.yaml")))
        raise WorkflowError(name_or_path, f"no such workflow file or preset (presets: {known})")
    try:
        data = _NoAliasLoader(path.read_text()).get_single_data()
    except yaml.YAMLError as exc:
        raise WorkflowError(path, f"not valid YAML: {str(exc).splitlines()[0]}") from None
    wf = validate(data, str(path))
    wf["name"] = wf["name"] or path.stem
    return wf


def list_workflows() -> list[str]:
    """Names of the presets shipped in ``workflows/``."""
    return sorted(p.stem for p in WORKFLOW_DIR.glob("*.yaml"))
