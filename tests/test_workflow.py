import pytest

from histo.errors import WorkflowError
from histo.workflow import list_workflows, load_workflow, validate


def test_presets_load_and_fill_defaults():
    names = list_workflows()
    assert {"lymph-node-he", "synovium-he"} <= set(names)
    for name in names:
        wf = load_workflow(name)
        assert wf["name"] == name
        assert wf["segmentation"]["tile_um"] > 0
        assert isinstance(wf["tissue"]["mpp"], float)


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
    assert wf["segmentation"]["tile_um"] == 256.0 and isinstance(wf["segmentation"]["halo_um"], float)
