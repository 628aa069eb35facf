"""Neighbourhood statistics at whole-slide scale: wall time and peak memory for N cells.

    python bench/neighbourhood_scale.py [--sizes 12000 100000 500000 1000000] [--workdir /tmp/histo-bench]

For each size, lays out a synthetic lymph node (histo_sample's scene: tissue pieces, follicles
with germinal centres, paracortex) big enough for that many truth nuclei, keeps a seeded subset of
exactly N, finds and assigns the regions (once, cached as a parquet), then runs
``histo.stats.neighbourhood.neighbourhood_stats`` with the lymph-node-he preset's parameters in a child
process while sampling the process tree's resident memory (bench/peak_memory.py); centralities are
computed at every size (``centrality_scores.max_cells`` raised to the cell count). Prints the
statistics' own time and the seconds per statistic (summed over regions), the child's wall time,
the sampled peak, the kernel's high-water mark (``ru_maxrss``, catches spikes between samples),
the system load, and the ratio of the largest size to the smallest. Targets (issue 19): under
15 s at 200,000 cells and under 60 s at 1,000,000, peak under 8 GB.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from peak_memory import run_sampled

CELLS_PER_MM2 = 5_000  # lower bound of the scene's nucleus density over its whole square, to size it


def make_cells(n: int, path: Path, seed: int = 7) -> None:
    """Truth cells of a generated lymph node (≥ n nuclei, seeded subset of n) with region ids."""
    from histo.structures.regions import assign_cells, find_regions
    from histo_sample import scene as sc

    side_um = np.sqrt(n / CELLS_PER_MM2) * 1e3
    while True:
        scene = sc.make_scene("lymph-node", int(side_um / 0.5), seed, 0.5)
        nuc = sc.nuclei_in(scene, 0.0, 0.0, side_um, side_um)
        if len(nuc["x"]) >= n:
            break
        side_um *= 1.25
    keep = np.sort(np.random.default_rng(seed).choice(len(nuc["x"]), n, replace=False))
    cells = pd.DataFrame(
        {
            "x_um": nuc["x"][keep].astype(np.float64),
            "y_um": nuc["y"][keep].astype(np.float64),
            "cell_type": sc.cell_type(nuc["style"][keep]),
            "area_um2": (np.pi * nuc["a"].astype(np.float64) * nuc["b"])[keep],
        }
    )
    regions = find_regions(cells, [b.polygon(720) for b in scene.pieces], "lymph-node")
    pd.concat([cells, assign_cells(cells, regions)], axis=1).to_parquet(path)  # ids stay categorical


def stats(path: Path) -> None:
    """Child process: the preset's neighbourhood statistics on the cells in ``path``, timed per step."""
    import squidpy as sq

    from histo.stats import neighbourhood as nb
    from histo.workflow import load_workflow

    cells = pd.read_parquet(path)
    params = load_workflow("lymph-node-he").neighbourhood
    params = params.replace(centrality_scores=params.centrality_scores.replace(max_cells=len(cells)))
    steps: dict[str, float] = {}
    for module, name in (
        (sq.gr, "spatial_neighbors_delaunay"),
        (sq.gr, "nhood_enrichment"),
        (nb, "_interaction"),
        (nb, "centrality_scores"),
        (nb, "co_occurrence"),
        (nb, "_ripley"),
        (nb, "_moran"),
    ):
        setattr(module, name, _timed(getattr(module, name), name.strip("_"), steps))
    t = time.perf_counter()
    res = nb.neighbourhood_stats(cells, params)
    regions = res["regions"]
    print(
        f"  stats_s={time.perf_counter() - t:.1f} regions={len(regions)} "
        f"co_occurrence_n={regions['slide']['co_occurrence_n_cells']} ripley_n={regions['slide']['ripley_n_cells']}"
        f"\n  step_s: {' '.join(f'{k}={v:.1f}' for k, v in steps.items())}",
        flush=True,
    )


def _timed(fn, name: str, steps: dict[str, float]):
    """``fn`` adding its seconds to ``steps[name]``."""

    def run(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            steps[name] = steps.get(name, 0.0) + time.perf_counter() - t

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[12_000, 100_000, 500_000, 1_000_000])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/histo-bench"))
    ap.add_argument("--stats", type=Path, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.stats:
        return stats(args.stats)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        path = args.workdir / f"nhood-cells-{n}.parquet"
        if not path.exists():
            make_cells(n, path)
        wall, peak = run_sampled([sys.executable, __file__, "--stats", str(path)])
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # largest child so far
        results.append((n, wall, peak))
        print(
            f"cells={n} wall_s={wall:.1f} peak_rss_gb={peak / 1e9:.2f} maxrss_gb={maxrss / 1e9:.2f} "
            f"load_1min={os.getloadavg()[0]:.1f} cpus={os.cpu_count()}",
            flush=True,
        )
    (n0, w0, p0), (n1, w1, p1) = results[0], results[-1]
    print(f"ratio {n1} vs {n0} cells: time {w1 / w0:.2f}, peak memory {p1 / p0:.2f}")


if __name__ == "__main__":
    main()
