import dataclasses
import json

import pytest
import yaml

from histo.errors import WorkflowError
from histo.workflow import REFERENCE, SCHEMA, WORKFLOW_DIR, Workflow, list_workflows, load_workflow, validate


def test_presets_load_and_fill_defaults():
    names = list_workflows()
    assert {"lymph-node-he", "synovium-he"} <= set(names)
    for name in names:
        wf = load_workflow(name)
        assert isinstance(wf, Workflow) and wf.name == name
        assert wf.segmentation.tile_um > 0
        assert isinstance(wf.tissue.mpp, float)
    assert REFERENCE not in names


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text("name: x\nsegmentation:\n  tile_sz: 3\n")
    with pytest.raises(WorkflowError, match=r"unknown key 'segmentation.tile_sz'") as err:
        load_workflow(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"segmentation": {"tile_um": "big"}}, "segmentation.tile_um"),
        ({"segmentation": {"tile_um": True}}, "segmentation.tile_um"),
        ({"tissue": {"mpp": [8]}}, "tissue.mpp"),
        ({"stain": 3}, "stain"),
        ({"segmentation": 5}, "segmentation"),
        ({"segmentation": {"flips": 3}}, "segmentation.flips"),
        ({"segmentation": {"flips": 1.5}}, "segmentation.flips"),
    ],
)
def test_wrong_type_is_named(data, key):
    with pytest.raises(WorkflowError, match=key.replace(".", r"\.")):
        validate(data, "wf.yaml")


def test_bad_values_and_files(tmp_path):
    with pytest.raises(WorkflowError, match="stain"):
        validate({"stain": "pas"})
    with pytest.raises(WorkflowError, match="no such workflow"):
        load_workflow("no-such-preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(WorkflowError, match="not valid YAML"):
        load_workflow(bad)


def test_integers_become_floats():
    wf = validate({"segmentation": {"tile_um": 256, "halo_um": 30}})
    assert wf.segmentation.tile_um == 256.0 and isinstance(wf.segmentation.halo_um, float)


def _keys(mapping: dict, where: str = "") -> set[str]:
    """Dotted keys of a nested mapping; endpoint and gate lists are values."""
    out = set()
    for key, value in mapping.items():
        name = f"{where}{key}"
        out |= _keys(value, f"{name}.") if isinstance(value, dict) else {name}
    return out


def test_reference_preset_is_exactly_the_defaults():
    """workflows/reference.yaml lists every key, and each with its default: it cannot drift from the dataclasses."""
    path = WORKFLOW_DIR / f"{REFERENCE}.yaml"
    data = yaml.safe_load(path.read_text())
    assert _keys(data) == _keys(SCHEMA)
    reference = load_workflow(path)
    assert reference.name == REFERENCE
    assert json.dumps(reference.replace(name=None).as_dict()) == json.dumps(Workflow().as_dict())
    assert reference.replace(name="default") == load_workflow(None)


def test_presets_state_only_what_differs(tmp_path):
    """A preset's parameter sections hold no key at its default (identity keys aside: name, description,
    tissue type, stain, model), except the synovium lists kept as written for the fingerprint."""
    kept = {"regions.lining.deep_um", "regions.scores.stroma_bands_per_mm2"}
    defaults = Workflow().as_dict()
    for name in list_workflows():
        data = yaml.safe_load((WORKFLOW_DIR / f"{name}.yaml").read_text())
        for key in _keys({k: v for k, v in data.items() if isinstance(v, dict)}) - kept:
            value, default = data, defaults
            for part in key.split("."):
                value, default = value[part], default[part]
            assert value != default or key == "regions.structures", (name, key)


def test_workflow_is_frozen_and_typed():
    wf = load_workflow("synovium-he")
    with pytest.raises(dataclasses.FrozenInstanceError):
        wf.stain = "if"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        wf.neighbourhood.ripley.max_um = 5.0  # type: ignore[misc]
    assert wf.regions.aggregate.eps_um == 12.0 and wf.cell_types.learned is False
    assert validate(wf.as_dict(), "again") == wf  # run.json's workflow loads back into the same Workflow


def test_section_errors_keep_their_messages():
    with pytest.raises(WorkflowError, match=r"wf\.yaml: unknown key 'neighbourhood\.ripley\.max_cell' \(allowed: "):
        validate({"neighbourhood": {"ripley": {"max_cell": 5}}}, "wf.yaml")
    with pytest.raises(WorkflowError, match=r"'neighbourhood\.graph' must be one of delaunay, radius, got 'knn'"):
        validate({"neighbourhood": {"graph": "knn"}}, "wf.yaml")
    with pytest.raises(WorkflowError, match=r"'marker_gates': gate"):
        validate({"stain": "if", "marker_gates": {"gates": [{"marker": "CD3"}]}}, "wf.yaml")
    with pytest.raises(WorkflowError, match=r"'endpoints\.primary\[0\]' needs 'unit'"):
        validate({"endpoints": {"primary": [{"metric": "n_cells"}]}}, "wf.yaml")
    with pytest.raises(WorkflowError, match=r"'cell_types\.calibrate' has the wrong type: 'yes' \(str\)"):
        validate({"cell_types": {"calibrate": "yes"}}, "wf.yaml")
