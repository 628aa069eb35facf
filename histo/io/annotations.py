"""User annotations from QuPath GeoJSON (level-0 pixels) as regions in µm, with errors that name the
file and the feature. The bundle's own GeoJSON is written by :mod:`histo.outputs.export`."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape
from shapely.validation import explain_validity

from histo.errors import HistoError
from histo.io.bundle import ID_COLUMNS

MAX_COORD_PX = 1e9  # annotation coordinates beyond this are not on any slide (and overflow areas)


def import_annotations(
    path: str | Path, mpp: float, object_types: tuple[str, ...] | None = ("annotation",), repair: bool = False
) -> gpd.GeoDataFrame:
    """User annotations from a QuPath GeoJSON export (FeatureCollection, list of Features or one
    Feature; coordinates in level-0 pixels) as regions in µm: kind ``annotation``, ``name`` = the
    QuPath classification (else the object's name, else ``annotation``), ids ``annotation-<n>`` in
    file order. Objects whose ``objectType`` (default ``annotation``) is not in ``object_types``
    (e.g. detections, cells) are skipped; ``object_types=None`` keeps every object. ``repair``
    mends invalid (e.g. self-intersecting) polygons with ``shapely.make_valid`` instead of refusing
    them (hand-drawn nucleus outlines often cross themselves).

    Raises HistoError naming the file and the 1-based feature number for anything else: not JSON,
    not GeoJSON, a feature without an area geometry, invalid coordinates, an invalid polygon.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except RecursionError:
        raise HistoError(path, "not GeoJSON annotations: nested too deeply") from None
    except OSError as exc:
        raise HistoError(path, f"cannot read the annotation file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise HistoError(path, "not a GeoJSON file: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise HistoError(
            path, f"not a GeoJSON file: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})"
        ) from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection" and isinstance(data.get("features"), list):
        features = data["features"]
    elif isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        raise HistoError(path, "not GeoJSON annotations: expected a FeatureCollection, a Feature or a list of Features")
    rows = []
    for i, feat in enumerate(features, 1):
        where = f"feature {i} of {len(features)}"
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            raise HistoError(path, f"{where}: not a GeoJSON Feature")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise HistoError(path, f"{where}: 'properties' is not an object")
        if object_types is not None and props.get("objectType", "annotation") not in object_types:
            continue
        geom = _geometry(path, where, feat.get("geometry"), repair)
        cls = props.get("classification")
        name = (cls.get("name") if isinstance(cls, dict) else cls) or props.get("name") or "annotation"
        geom = shapely.transform(geom, lambda xy: xy * mpp)
        rows.append(
            dict(
                region_id=f"annotation-{len(rows) + 1}",
                kind="annotation",
                name=str(name),
                parent_id=None,
                tissue_id=None,
                area_um2=geom.area,
                edge_truncated=False,
                geometry=geom,
            )
        )
    cols = list(ID_COLUMNS) + ["area_um2", "edge_truncated"]
    return gpd.GeoDataFrame(rows, columns=cols + ["geometry"], geometry="geometry")


def _geometry(path, where: str, geo, repair: bool = False) -> shapely.Geometry:
    """A valid Polygon / MultiPolygon from a GeoJSON geometry (mended with ``make_valid`` when
    ``repair``), or a HistoError naming the feature."""
    if not isinstance(geo, dict) or "type" not in geo:
        raise HistoError(path, f"{where}: no geometry")
    if geo["type"] not in ("Polygon", "MultiPolygon"):
        raise HistoError(
            path, f"{where}: a {geo['type']} is not an area (only Polygon and MultiPolygon annotations are imported)"
        )
    try:
        geom = shape(geo)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, shapely.errors.GEOSException) as exc:
        raise HistoError(path, f"{where}: invalid {geo['type']} coordinates ({exc})") from None
    if not (np.abs(shapely.get_coordinates(geom)) <= MAX_COORD_PX).all():  # NaN fails too
        raise HistoError(path, f"{where}: {geo['type']} coordinates that are not numbers within ±{MAX_COORD_PX:.0e} px")
    if repair and not geom.is_valid:
        geom = shapely.union_all(
            [g for g in shapely.get_parts(shapely.make_valid(geom)) if isinstance(g, (Polygon, MultiPolygon))]
        )
    if not geom.is_valid:
        reason = explain_validity(geom)
        what = "self-intersecting polygon" if "Self-intersection" in reason else "invalid polygon"
        raise HistoError(
            path,
            f"{where}: {what} ({reason}); fix it in QuPath (e.g. Objects > Annotations > "
            "Simplify shape) and export again",
        )
    if geom.is_empty or geom.area <= 0:
        raise HistoError(path, f"{where}: empty {geo['type']} (no area)")
    return geom
