"""The ``histo`` command line: sample, run, train.

Errors in the input end with one line naming the file and the problem and a non-zero exit code;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histo.errors import HistoError

EXIT_INPUT_ERROR = 2


def _sample(args) -> None:
    from histo_sample import write_sample

    info = write_sample(args.kind, args.out, size=args.size, seed=args.seed, mpp=args.mpp)
    print(f"wrote {args.out} ({args.size}² px at {args.mpp} µm/px, {info.get('n_nuclei', '?')} nuclei) and its truth files")


def _run(args) -> None:
    from histo.slide import open_slide
    from histo.workflow import load_workflow

    load_workflow(args.workflow)  # fail fast, before any worker starts
    open_slide(args.slide, mpp=args.mpp)
    from histo.cluster import dask_client
    from histo.pipeline import run_slide

    with dask_client(args.scheduler, args.workers) as client:
        bundle = run_slide(args.slide, args.out, workflow=args.workflow, model=args.model, mpp=args.mpp,
                           client=client, show_progress=not args.quiet, annotations=args.annotations)
    print(f"wrote {bundle}")


def _train(args) -> None:
    from histo.train import main_train

    out = main_train(args.images, args.masks, Path(args.out), mpp=args.mpp, image_mpp=args.image_mpp,
                     epochs=args.epochs, steps=args.steps, patch_size=args.patch, seed=args.seed,
                     command="histo " + " ".join(sys.argv[1:]))
    print(f"wrote model {out}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histo", description="Whole-slide analysis of synovial and lymph-node biopsies.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="write a generated H&E slide with ground truth")
    s.add_argument("kind", choices=["lymph-node", "synovium"])
    s.add_argument("out", help="NAME.ome.tif; NAME.truth.parquet and NAME.truth.geojson are written beside it")
    s.add_argument("--size", type=int, default=4096, help="level-0 edge in px (default 4096)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mpp", type=float, default=0.5, help="µm per px (default 0.5)")
    s.set_defaults(func=_sample)

    r = sub.add_parser("run", help="analyse a slide and write its result bundle")
    r.add_argument("slide")
    r.add_argument("--out", required=True, help="output folder; the bundle is OUT/<slide name>/")
    r.add_argument("--workflow", default="lymph-node-he", help="preset name in workflows/ or a YAML file")
    r.add_argument("--model", help="StarDist registry name, shipped model name or model folder")
    r.add_argument("--mpp", type=float, help="µm per px of level 0 (overrides or supplies the file's)")
    r.add_argument("--annotations", help="QuPath GeoJSON of regions to measure (level-0 pixel coordinates)")
    r.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")
    r.add_argument("--scheduler", help="address of an existing dask.distributed scheduler")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_run)

    t = sub.add_parser("train", help="train a StarDist model on image/mask pairs")
    t.add_argument("images", help="folder of RGB images (TIFF/PNG)")
    t.add_argument("masks", help="folder of instance masks with the same file stems")
    t.add_argument("--out", required=True, help="model folder to write (resumes if it holds a checkpoint)")
    t.add_argument("--mpp", type=float, default=0.5, help="µm per px the model works at (default 0.5)")
    t.add_argument("--image-mpp", type=float, required=True, help="µm per px of the training images")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--steps", type=int, default=100, help="steps per epoch")
    t.add_argument("--patch", type=int, default=256, help="patch edge, px")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except HistoError as exc:
        if args.debug:
            raise
        print(f"histo: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("histo: interrupted; completed bundles are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
