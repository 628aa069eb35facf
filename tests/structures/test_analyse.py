"""analyse_cells: the errors a workflow's typing step gives on a slide it does not fit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from histo.errors import HistoError
from histo.structures.analyse import analyse_cells
from histo.workflow import load_workflow, validate


def test_a_gate_on_a_channel_the_slide_lacks_names_the_slide_and_the_workflow():
    rng = np.random.default_rng(0)
    cells = pd.DataFrame(
        {"x_um": rng.uniform(0, 500, 200), "y_um": rng.uniform(0, 500, 200), "mean_CD20": rng.uniform(0, 9, 200)}
    )
    preset = load_workflow("lymph-node-if").as_dict()
    gates = preset["marker_gates"]["gates"]
    assert any(g["marker"] == "CD3" for g in gates)  # the preset gates CD3, which this slide lacks
    wf = validate(preset | {"name": "panel-b"})
    slide = SimpleNamespace(path=Path("/data/LN-07.ome.tif"), mpp=0.5)
    with pytest.raises(HistoError) as err:
        analyse_cells(cells, slide, None, wf)
    assert err.value.path == "/data/LN-07.ome.tif"
    assert "panel-b" in err.value.problem and "'mean_CD3'" in err.value.problem
