"""Peak memory of ``histo run`` as slides grow: the whole process tree (client + Dask workers).

    python bench/peak_memory.py --sizes 10000 40000 [--workdir /tmp/histo-bench]

Generates a lymph-node slide of each size (once), runs ``histo run`` on it and samples the summed
resident memory of the command and all its children every 0.2 s. The last line prints the ratio of
the largest slide's peak to the smallest's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from memwatch import PeakRSS


def run_sampled(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak summed RSS bytes of it and its children)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    with PeakRSS(proc.pid) as peak:
        if proc.wait() != 0:
            sys.exit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, peak.bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/histo-bench"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--mpp",
        type=float,
        default=0.25,
        help="µm/px of the generated slides (0.25: the shipped model's, no resampling)",
    )
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    histo = [sys.executable, "-m", "histo.cli"]
    results = []
    for size in args.sizes:
        slide = args.workdir / f"ln-{size}-{args.mpp}.ome.tif"
        if not slide.exists():
            subprocess.run(
                [
                    *histo,
                    "sample",
                    "lymph-node",
                    str(slide),
                    "--size",
                    str(size),
                    "--seed",
                    "7",
                    "--mpp",
                    str(args.mpp),
                ],
                check=True,
            )
        wall, peak = run_sampled(
            [*histo, "run", str(slide), "--out", str(args.workdir / "out"), "--workers", str(args.workers), "--quiet"]
        )
        run = json.loads((args.workdir / "out" / slide.name.removesuffix(".ome.tif") / "run.json").read_text())
        results.append((size, wall, peak, run["n_cells"], run["n_tiles"]))
        print(
            f"size={size} wall_s={wall:.1f} peak_rss_gb={peak / 1e9:.2f} "
            f"n_cells={run['n_cells']} n_tiles={run['n_tiles']}",
            flush=True,
        )
    small, large = results[0], results[-1]
    print(f"peak_ratio={large[2] / small[2]:.3f} ({large[0]}² vs {small[0]}², {args.workers} workers)")


if __name__ == "__main__":
    main()
