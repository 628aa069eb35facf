"""Cell typing: H&E rules against the generator's truth, marker gates against expert gates (CyCIF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from histo.errors import SlideError, WorkflowError
from histo.segment.features import nucleus_features
from histo.segment.nuclei import polygon_area
from histo.structures.phenotypes import (
    HE_TYPES,
    HERules,
    auto_threshold,
    check_gates,
    classify_he,
    gate_markers,
)
from histo.workflow import cell_type_names, load_workflow, nucleus_channel, validate

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CYCIF = SHARED / "data" / "mcmicro_exemplar001_cycif"
MPP = 0.5


def label_polygons(lab: np.ndarray, n_rays: int = 32, step: float = 0.25, r_max: float = 16.0):
    """StarDist-like polygons of instance labels: from each label's centroid, the distance (px) to
    the first pixel of another label along ``n_rays`` rays. Returns (ids, coord (n, 2, n_rays))."""
    ids = np.unique(lab)
    ids = ids[ids > 0]
    cy, cx = np.array(ndi.center_of_mass(np.ones_like(lab), lab, ids)).T
    ang = 2 * np.pi * np.arange(n_rays) / n_rays
    t = np.arange(step, r_max, step)
    yy = np.clip(np.rint(cy[:, None, None] + np.sin(ang)[:, None] * t), 0, lab.shape[0] - 1).astype(int)
    xx = np.clip(np.rint(cx[:, None, None] + np.cos(ang)[:, None] * t), 0, lab.shape[1] - 1).astype(int)
    inside = lab[yy, xx] == ids[:, None, None]
    dist = t[np.argmin(np.cumprod(inside, axis=-1), axis=-1)] - step / 2
    return ids, np.stack([cy[:, None] + dist * np.sin(ang), cx[:, None] + dist * np.cos(ang)], axis=1)


@pytest.fixture(scope="module")
def node_cells():
    """Cells table of a 1024² px region (0.5 µm/px) centred on a follicle with a germinal centre of a
    generated lymph node, with the truth cell type of each nucleus (centre inside the region)."""
    from histo_sample import make_scene, render_region
    from histo_sample.scene import STYLE_TYPE

    scene = make_scene("lymph-node", 8192, 3, MPP)
    follicle = next(s for s in scene.structures if s.kind == "follicle" and s.has_gc)
    x0, y0 = int(follicle.blob.cx / MPP) - 512, int(follicle.blob.cy / MPP) - 512
    rgb, lab = render_region(scene, x0, y0, 1024, 1024)
    ids, coord = label_polygons(lab)
    nuc = scene.nuclei_in(x0 * MPP, y0 * MPP, (x0 + 1024) * MPP, (y0 + 1024) * MPP)
    truth = pd.Series(STYLE_TYPE[nuc["style"]], index=nuc["id"]).reindex(ids)
    cells = nucleus_features(rgb, coord, MPP, "he")
    cells["area_um2"] = polygon_area(coord) * MPP**2
    cells["y_um"], cells["x_um"] = (coord.mean(axis=2) + [y0, x0]).T * MPP
    cells["truth"] = truth.to_numpy()
    return cells[cells.truth.notna()].reset_index(drop=True)


def scores(types, truth) -> dict:
    """Lymphocyte vs non-lymphocyte accuracy and recalls, and the confusion table (text)."""
    pred, true = np.asarray(types) == "lymphocyte", np.asarray(truth) == "lymphocyte"
    return {
        "accuracy": (pred == true).mean(),
        "lymphocyte_recall": pred[true].mean(),
        "non_lymphocyte_recall": (~pred[~true]).mean(),
        "confusion": pd.crosstab(
            np.asarray(truth), np.asarray(types), rownames=["truth"], colnames=["called"]
        ).to_string(),
    }


def test_classify_he_matches_truth_on_generated_node(node_cells):
    types, report = classify_he(node_cells)
    assert list(types.categories) == list(HE_TYPES)
    s = scores(types, node_cells.truth)
    print(f"\n{s['confusion']}\n{report}")
    assert s["accuracy"] >= 0.85, s
    assert s["lymphocyte_recall"] >= 0.9 and s["non_lymphocyte_recall"] >= 0.8, s
    called = pd.Series(np.asarray(types))
    assert (called[node_cells.truth == "large"] == "large").mean() >= 0.8, s["confusion"]
    assert (called[node_cells.truth == "stromal"] == "stromal").mean() >= 0.8, s["confusion"]
    assert report["calibrated"] and report["n_reference_cells"] >= 50
    assert 25 <= report["lymphocyte_area_um2"] <= 31  # generated lymphocytes: 28 ± 2.6 µm²


def test_calibration_follows_a_paler_slide_and_larger_masks(node_cells):
    """A slide stained 40 % paler and a model drawing 25 % larger nuclei: calibrated thresholds follow."""
    shifted = node_cells.assign(
        hematoxylin_od=node_cells.hematoxylin_od * 0.6,
        area_um2=node_cells.area_um2 * 1.25,
        major_axis_um=node_cells.major_axis_um * 1.25**0.5,
        minor_axis_um=node_cells.minor_axis_um * 1.25**0.5,
    )
    base, _ = classify_he(node_cells)
    calibrated, report = classify_he(shifted)
    assert (np.asarray(calibrated) == np.asarray(base)).mean() >= 0.97
    assert report["lymphocyte_hematoxylin_od"] == pytest.approx(
        0.6 * classify_he(node_cells)[1]["lymphocyte_hematoxylin_od"], rel=0.02
    )
    slide_wide, report = classify_he(
        shifted, HERules(calibrate=False)
    )  # no density: every round lymphocyte-sized nucleus
    assert not report["calibrated"] and report["reference_source"] == "slide"
    assert scores(slide_wide, shifted.truth)["lymphocyte_recall"] >= 0.8  # still relative to the slide, not a preset


def test_he_rules_schema_and_errors(node_cells):
    from histo.config import schema

    for key, (types, default) in schema(HERules).items():
        assert isinstance(default, types), key
    with pytest.raises(TypeError, match="lymphocyte_area"):
        HERules(lymphocyte_area=3)
    with pytest.raises(WorkflowError, match=r"w.yaml: 'cell_types.lymphocyte_classes'.*'epithelium'"):
        validate({"cell_types": {"lymphocyte_classes": ["epithelium"]}}, "w.yaml")
    with pytest.raises(ValueError, match="hematoxylin_od"):
        classify_he(node_cells.drop(columns="hematoxylin_od"))
    few, report = classify_he(node_cells.iloc[:30])  # too few for any reference set: all nuclei's OD, said so
    assert not report["calibrated"] and report["reference_source"] == "all"
    assert report["lymphocyte_hematoxylin_od"] == pytest.approx(np.median(node_cells.hematoxylin_od.iloc[:30]))
    empty, report = classify_he(node_cells.iloc[:0])
    assert len(empty) == 0 and report["counts"]["lymphocyte"] == 0


def test_learned_classes_are_kept_and_large_pale_nuclei_split_off(node_cells):
    """With a ``nucleus_class`` column the learned class wins; large pale non-epithelial nuclei are ``large``."""
    learned = np.where(
        node_cells.truth == "lymphocyte", "lymphocyte", np.where(node_cells.truth == "stromal", "stromal", "other")
    ).astype(object)
    learned[:5] = "epithelial"
    cells = node_cells.assign(nucleus_class=learned)
    types, report = classify_he(cells)
    called = np.asarray(types)
    assert report["method"] == "learned" and report["reference_source"] == "learned"
    assert (called[:5] == "epithelial").all()
    truth = node_cells.truth.to_numpy()
    assert (called[5:][truth[5:] == "large"] == "large").mean() >= 0.8
    assert (called[5:][truth[5:] == "lymphocyte"] == "lymphocyte").mean() >= 0.95
    assert report["lymphocyte_hematoxylin_od"] == pytest.approx(
        np.median(cells.hematoxylin_od[learned == "lymphocyte"])
    )
    rules_only, report = classify_he(cells, HERules(learned=False))
    assert report["method"] == "rules" and "epithelial" not in set(np.asarray(rules_only))


def test_lymphocyte_classes_retype_small_round_dark_nuclei_measured_on_the_slide(node_cells):
    """Lymphocytes the classifier calls epithelial become lymphocytes under ``lymphocyte_classes``,
    large pale nuclei it calls so do not; with too few learned lymphocytes nothing is retyped."""
    truth = node_cells.truth.to_numpy()
    lymph = np.flatnonzero(truth == "lymphocyte")
    learned = np.where(truth == "lymphocyte", "lymphocyte", "other").astype(object)
    learned[lymph[::3]] = "epithelial"  # a third of the lymphocytes called epithelial
    learned[truth == "large"] = "epithelial"
    cells = node_cells.assign(nucleus_class=learned)
    kept, report = classify_he(cells)
    assert "retyped_lymphocyte" not in report
    assert (np.asarray(kept)[lymph[::3]] == "epithelial").all()
    types, report = classify_he(cells, HERules(lymphocyte_classes=["epithelial"]))
    called = np.asarray(types)
    assert report["reference_source"] == "learned" and report["retyped_lymphocyte"] > 0
    assert (called[lymph[::3]] == "lymphocyte").mean() >= 0.8
    assert (called[truth == "large"] == "lymphocyte").mean() <= 0.05
    assert report["retyped_lymphocyte"] == (called == "lymphocyte").sum() - (learned == "lymphocyte").sum()
    few = learned.copy()
    few[np.flatnonzero(learned == "lymphocyte")[40:]] = "epithelial"  # 40 learned lymphocytes: below 50
    types, report = classify_he(node_cells.assign(nucleus_class=few), HERules(lymphocyte_classes=["epithelial"]))
    assert report["reference_source"] == "all" and report["retyped_lymphocyte"] == 0
    assert (np.asarray(types) == "lymphocyte").sum() == 40


def test_gate_markers_order_auto_and_report():
    rng = np.random.default_rng(0)
    n = 4000
    cd20 = np.where(rng.random(n) < 0.3, rng.lognormal(7, 0.3, n), rng.lognormal(4, 0.3, n))
    cd3 = np.where(rng.random(n) < 0.4, rng.lognormal(6, 0.3, n), rng.lognormal(3, 0.3, n))
    cells = pd.DataFrame({"mean_CD20": cd20, "CD3": cd3})
    gates = [
        {"marker": "CD20", "threshold": "auto", "cell_type": "B cell"},
        {"marker": "CD3", "column": "CD3", "threshold": 150.0, "cell_type": "T cell"},
    ]
    for method in ("otsu", "gmm"):
        types, report = gate_markers(cells, gates, auto=method)
        assert list(types.categories) == ["B cell", "T cell", "other"]
        b = np.asarray(types == "B cell")
        assert (b == (np.log(cd20) > 5.5)).mean() > 0.99
        assert (np.asarray(types == "T cell") == (~b & (cd3 >= 150))).all()
        assert report[0]["method"] == method and np.exp(4.9) < report[0]["threshold"] < np.exp(6.1)
        assert report[1] == {
            "marker": "CD3",
            "column": "CD3",
            "cell_type": "T cell",
            "method": "manual",
            "threshold": 150.0,
            "positive_fraction": float((cd3 >= 150).mean()),
            "typed_fraction": float((~b & (cd3 >= 150)).mean()),
        }
    with pytest.raises(ValueError, match="automatic thresholds are off"):
        gate_markers(cells, gates, auto=None)
    with pytest.raises(ValueError, match="no column 'mean_CD68'"):
        gate_markers(cells, [{"marker": "CD68", "threshold": 1, "cell_type": "macrophage"}])
    with pytest.raises(ValueError, match="unknown automatic threshold method"):
        auto_threshold(cd20, "kmeans")
    types, report = gate_markers(cells.iloc[:1], gates[:1])  # one cell: no automatic threshold, nobody positive
    assert report[0]["threshold"] is None and list(types) == ["other"]
    with pytest.raises(ValueError, match="threshold must be a number or 'auto'"):
        check_gates([{"marker": "CD3", "threshold": "high", "cell_type": "T cell"}])
    with pytest.raises(ValueError, match="needs 'marker' and 'cell_type'"):
        check_gates([{"marker": "CD3", "celltype": "T cell"}])


@pytest.mark.skipif(
    not CYCIF.exists(), reason=f"{CYCIF} not present (../shared is provided to developers and CI, not shipped)"
)
def test_auto_gates_agree_with_expert_gates_on_cycif():
    """Per-slide thresholds vs the expert gates (log1p units, scimap) on a real 11k-cell CyCIF table."""
    cells = pd.read_csv(CYCIF / "exemplar-001--unmicst_cell.csv")
    manual = pd.read_csv(CYCIF / "manual_gates.csv", index_col=0).iloc[:, 0]
    rows = []
    for marker, gate in manual.items():
        expert = cells[marker].to_numpy() >= np.expm1(gate)
        row = {"marker": marker, "expert_positive": expert.mean()}
        for method in ("otsu", "gmm"):
            types, report = gate_markers(cells, [{"marker": marker, "column": marker, "cell_type": "pos"}], auto=method)
            called = np.asarray(types == "pos")
            p_o = (called == expert).mean()
            p_e = called.mean() * expert.mean() + (1 - called.mean()) * (1 - expert.mean())
            row |= {
                f"{method}_positive": called.mean(),
                f"{method}_agreement": p_o,
                f"{method}_kappa": (p_o - p_e) / (1 - p_e),
            }
        rows.append(row)
    table = pd.DataFrame(rows).set_index("marker").round(3)
    print("\n" + table.to_string())
    assert table.loc["CD45", "otsu_agreement"] >= 0.9  # the lineage marker with two clear populations
    assert table["otsu_agreement"].median() >= 0.9
    assert (table["otsu_agreement"] >= 0.65).all()


def test_if_preset_names_its_gates_structure_cells_and_nucleus_channel():
    wf = load_workflow("lymph-node-if")
    assert wf.stain == "if" and wf.model == "2D_versatile_fluo"
    assert [g["marker"] for g in wf.marker_gates.gates] == ["CD20", "CD3", "CD68", "CD138"]
    assert cell_type_names(wf) == ["B cell", "T cell", "macrophage", "plasma cell", "other"]
    assert wf.regions.follicle.cell_types == ["B cell"] and wf.regions.structures == ["follicle"]
    assert nucleus_channel(wf, ["DAPI", "CD20", "CD3"], "s.ome.tif") == 0
    assert nucleus_channel(wf, ["CD20", "DAPI"], "s.ome.tif") == 1
    with pytest.raises(SlideError, match=r"s\.ome\.tif: no channel 'DAPI' .* the slide's channels: DNA1, CD20"):
        nucleus_channel(wf, ["DNA1", "CD20"], "s.ome.tif")
    default = load_workflow("lymph-node-he")
    assert nucleus_channel(default, ["DNA1", "CD20"], "s.ome.tif") == 0  # unset: the first channel (tissue detection's)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"follicle": {"cell_types": ["B cells"]}},
            r"'regions\.follicle\.cell_types': 'B cells' is not a cell type of this workflow "
            r"\(stain 'if' gives: B cell, T cell, ",
        ),
        ({"follicle": {"cell_types": []}}, r"'regions\.follicle\.cell_types' is empty"),
        ({"structures": ["follicle", "germinal_centre"]}, r"'regions\.germinal_centre\.cell_types' is empty"),
        ({"structures": ["follicle", "tonsil"]}, r"'regions\.structures': unknown structure 'tonsil'"),
    ],
)
def test_structure_cell_types_must_be_the_workflows_own(tmp_path, change, message):
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "workflows" / "lymph-node-if.yaml").read_text())
    for key, value in change.items():
        data["regions"][key] = {**data["regions"][key], **value} if isinstance(value, dict) else value
    path = tmp_path / "my-if.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(WorkflowError, match=message) as err:
        load_workflow(path)
    assert err.value.path == str(path)


def test_he_structure_cell_types_are_the_rules_types(tmp_path):
    path = tmp_path / "he.yaml"
    path.write_text("stain: he\nregions:\n  follicle:\n    cell_types: [B cell]\n")
    with pytest.raises(
        WorkflowError, match=r"'B cell' is not a cell type .* gives: lymphocyte, large, stromal, epithelial, other"
    ):
        load_workflow(path)
    path.write_text("stain: if\n")  # gates missing: the default (H&E) follicle cells are not this workflow's
    with pytest.raises(
        WorkflowError, match=r"'regions\.follicle\.cell_types': 'lymphocyte' is not a cell type .* gives: other"
    ):
        load_workflow(path)
    path.write_text("stain: he\ntissue_type: synovium\nregions:\n  follicle:\n    cell_types: [nonsense]\n")
    assert load_workflow(path).regions.follicle.cell_types == ["nonsense"]  # follicles not looked for in synovium
