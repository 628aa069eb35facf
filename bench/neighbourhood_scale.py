"""Neighbourhood statistics at whole-slide scale: wall time and peak memory for N cells.

    python bench/neighbourhood_scale.py --sizes 100000 1000000 [--workdir /tmp/histo-bench]

For each size, lays out a synthetic lymph node (histo_sample's scene: tissue pieces, follicles
with germinal centres, paracortex) big enough for that many truth nuclei, keeps a seeded subset of
exactly N, finds and assigns the regions (once, cached as a parquet), then runs
``histo.neighbourhood.neighbourhood_stats`` with the lymph-node-he preset's parameters in a child
process while sampling the process tree's resident memory (bench/peak_memory.py). Prints wall
time, the sampled peak, the kernel's high-water mark (``ru_maxrss``, catches spikes between samples)
and the ratio of the largest size to the smallest. Target: 1,000,000 cells under 8 GB.
"""

from __future__ import annotations

import argparse
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
    from histo.regions import assign_cells, find_regions
    from histo_sample import scene as sc

    side_um = np.sqrt(n / CELLS_PER_MM2) * 1e3
    while True:
        scene = sc.make_scene("lymph-node", int(side_um / 0.5), seed, 0.5)
        nuc = sc.nuclei_in(scene, 0.0, 0.0, side_um, side_um)
        if len(nuc["x"]) >= n:
            break
        side_um *= 1.25
    keep = np.sort(np.random.default_rng(seed).choice(len(nuc["x"]), n, replace=False))
    cells = pd.DataFrame({"x_um": nuc["x"][keep].astype(np.float64), "y_um": nuc["y"][keep].astype(np.float64),
                          "cell_type": sc.cell_type(nuc["style"][keep]),
                          "area_um2": (np.pi * nuc["a"].astype(np.float64) * nuc["b"])[keep]})
    regions = find_regions(cells, [b.polygon(720) for b in scene.pieces], "lymph-node")
    pd.concat([cells, assign_cells(cells, regions)], axis=1).to_parquet(path)  # ids stay categorical


def stats(path: Path) -> None:
    """Child process: the preset's neighbourhood statistics on the cells in ``path``."""
    from histo.neighbourhood import neighbourhood_stats
    from histo.workflow import load_workflow

    cells = pd.read_parquet(path)
    t = time.perf_counter()
    res = neighbourhood_stats(cells, load_workflow("lymph-node-he")["neighbourhood"])
    regions = res["regions"]
    print(f"  stats_s={time.perf_counter() - t:.1f} regions={len(regions)} "
          f"co_occurrence_n={regions['slide']['co_occurrence_n_cells']} ripley_n={regions['slide']['ripley_n_cells']}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
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
        print(f"cells={n} wall_s={wall:.1f} peak_rss_gb={peak / 1e9:.2f} maxrss_gb={maxrss / 1e9:.2f}", flush=True)
    (n0, w0, p0), (n1, w1, p1) = results[0], results[-1]
    print(f"ratio {n1} vs {n0} cells: time {w1 / w0:.2f}, peak memory {p1 / p0:.2f}")


if __name__ == "__main__":
    main()
