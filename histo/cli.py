"""The ``histo`` command line: sample, run, batch, train, evaluate, export.

Errors in the input end with one line naming the file and the problem and a non-zero exit code;
``--debug`` shows the traceback instead. ``--debug``, ``-v`` and ``--log-level`` are taken before or
after the subcommand.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from histo.errors import HistoError

EXIT_INPUT_ERROR = 2
EXIT_CODES = """exit codes:
  0    done (histo batch: the batch ran, whatever each slide's status: read summary.csv)
  1    an unexpected error: a traceback (please report it)
  2    bad input or usage: one line naming the file (or option) and the problem
  130  interrupted (Ctrl-C): completed bundles are kept"""


def _sample(args) -> None:
    from histo_sample import write_sample

    if args.treatment and args.kind != "lymph-node":
        raise HistoError(None, f"--treatment {args.treatment} is built into lymph-node samples only, not {args.kind}")
    info = write_sample(
        args.kind,
        args.out,
        size=args.size,
        seed=args.seed,
        mpp=args.mpp,
        section=args.section,
        treatment=args.treatment,
    )
    print(
        f"wrote {args.out} ({args.size}² px at {args.mpp} µm/px, {info.get('n_nuclei', '?')} nuclei) "
        "and its truth files"
    )


def _run(args) -> None:
    import shapely

    from histo.io.annotations import import_annotations
    from histo.io.bundle import check_same_input, slide_name
    from histo.io.slide import check_stain, open_slide
    from histo.workflow import load_workflow

    wf = load_workflow(args.workflow)  # fail fast, before any worker starts
    slide = open_slide(args.slide, mpp=args.mpp)
    check_stain(slide, wf.stain, wf.name)
    if args.annotations:
        regions = import_annotations(args.annotations, slide.mpp)
        h, w = (n * slide.mpp for n in slide.shape)
        if (outside := ~regions.intersects(shapely.box(0, 0, w, h))).any():
            raise HistoError(
                args.annotations,
                f"{regions.region_id[outside].iloc[0]} lies wholly outside the slide "
                f"({w:,.0f} × {h:,.0f} µm): drawn on another image, or in other units?",
            )
    if not args.overwrite:
        check_same_input(Path(args.out) / slide_name(args.slide), slide.path)
    from histo.run.cluster import dask_client
    from histo.run.pipeline import run_slide

    with dask_client(args.scheduler, args.workers) as client:
        bundle = run_slide(
            args.slide,
            args.out,
            workflow=args.workflow,
            model=args.model,
            mpp=args.mpp,
            client=client,
            show_progress=not args.quiet,
            annotations=args.annotations,
        )
    print(f"wrote {bundle}")


def _batch(args) -> None:
    from histo.run.batch import read_input, run_batch
    from histo.run.cluster import dask_client
    from histo.workflow import load_workflow

    sheet = read_input(args.input)  # fail fast, before any worker starts
    if args.workflow:
        load_workflow(args.workflow)

    summary = run_batch(
        sheet,
        args.out,
        workflow=args.workflow,
        model=args.model,
        mpp=args.mpp,
        show_progress=not args.quiet,
        cluster=lambda: dask_client(args.scheduler, args.workers),
    )
    ok = summary["status"].eq("ok")
    print(
        f"{ok.sum()} ok ({summary['reused'].sum()} reused), {(~ok).sum()} failed; "
        f"wrote {Path(args.out) / 'summary.csv'}"
    )


def _train(args) -> None:
    from histo.train.outlines import main_train

    datasets = [(args.images, args.masks, args.image_mpp, args.licence)] + [tuple(d) for d in args.data or []]
    if args.draws is not None:
        if len(args.draws) != len(datasets):
            raise HistoError(
                None, f"--draws: give one number per dataset ({len(datasets)}: the positional one, then each --data)"
            )
        datasets = [(*d, w) for d, w in zip(datasets, args.draws)]
    out = main_train(
        datasets,
        Path(args.out),
        mpp=args.mpp,
        epochs=args.epochs,
        steps=args.steps,
        patch_size=args.patch,
        batch_size=args.batch,
        val_fraction=args.val_fraction,
        learning_rate=args.learning_rate,
        stain_scale=args.stain_scale,
        scale_range=args.scale_jitter,
        hue_shift=args.hue_jitter,
        saturation_range=args.saturation_jitter,
        haze=args.haze,
        seed=args.seed,
        finalize=not args.keep_checkpoint,
        notes=args.note or None,
        init_weights=args.init,
        nms_threshs=args.nms_threshs,
        **({"unet_n_filter_base": args.filter_base} if args.filter_base else {}),
        **({"net_conv_after_unet": args.conv_after} if args.conv_after else {}),
        command="histo " + " ".join(args.argv),
    )
    print(f"wrote model {out}")


def _train_classes(args) -> None:
    from histo.train.classes import parse_class_values, read_types, train_classes, types_from_class_masks
    from histo.train.outlines import pairs_from_folders, pixel_sizes

    pairs = pairs_from_folders(args.images, args.masks)
    mpp = pixel_sizes(args.image_mpp, args.images)(pairs[0][0].stem)
    if Path(args.types).is_dir():
        if not args.class_values:
            raise HistoError(Path(args.types), "a folder of class masks needs --class-values (e.g. 1=epithelial)")
        types = types_from_class_masks(pairs, args.types, parse_class_values(args.class_values))
    else:
        types = read_types(args.types)
    datasets = [(pairs, mpp, types, str(args.images), args.licence or "unknown")]
    section = train_classes(
        datasets,
        args.model,
        epochs=args.epochs,
        val_fraction=args.val_fraction,
        seed=args.seed,
        stain=None if args.stain == "none" else args.stain,
        add=args.add,
        inference_turns=args.inference_turns,
        **({"filters": args.filters} if args.filters else {}),
        command="histo " + " ".join(args.argv),
    )
    v = section["validation"]
    what = f"a classifier of {len(section['members'])} members" if args.add else Path(args.model) / section["file"]
    print(f"wrote {what}: validation accuracy {v['accuracy']}, lymphocyte F1 {v['lymphocyte']['f1']}")


def _evaluate(args) -> None:
    from histo.train.evaluate import evaluate, format_table, run_images

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    errors = None
    bundles = args.bundles
    if args.images:
        if args.mpp is None:
            raise HistoError(args.images, "give the images' pixel size with --mpp (a number or a CSV image,mpp)")
        from histo.run.cluster import dask_client

        bundles = out / "bundles"
        with dask_client(args.scheduler, args.workers) as client:
            errors = run_images(
                args.truth,
                args.images,
                bundles,
                args.mpp,
                model=args.model,
                workflow=args.workflow,
                client=client,
                show_progress=not args.quiet,
            )
    elif not (bundles or args.pred):
        raise HistoError(
            args.truth,
            "give --bundles (histo bundles), --pred (label masks or GeoJSON) or --images (run histo on them first)",
        )
    types = None
    if args.types:
        from histo.train.classes import read_types

        types = read_types(args.types)
    table = evaluate(
        args.truth,
        bundles_dir=bundles,
        pred_dir=None if bundles else args.pred,
        thresh=args.iou,
        errors=errors,
        types=types,
    )
    table.to_csv(out / "scores.csv", index=False)
    if "confusion" in table.attrs:
        table.attrs["confusion"].to_csv(out / "confusion.csv")
    if args.record:
        from histo.train.evaluate import record_in_card

        if not args.model or not Path(args.model).is_dir():
            raise HistoError(args.model, "--record needs --model MODEL_FOLDER (the card to write into)")
        record_in_card(args.model, args.record, table, command="histo " + " ".join(args.argv))
    print(format_table(table))
    print(f"wrote {out / 'scores.csv'}")


def _export(args) -> None:
    if not (args.spatialdata or args.qupath_cells):
        raise HistoError(args.bundle, "say what to export: --spatialdata and/or --qupath-cells")
    from histo.io.bundle import is_complete

    if not is_complete(Path(args.bundle)):
        raise HistoError(args.bundle, "not a complete histo bundle (no run.json saying so)")
    if args.spatialdata:
        from histo.outputs.spatialdata_store import write_spatialdata

        print(f"wrote {write_spatialdata(args.bundle)}")
    if args.qupath_cells:
        from histo.outputs.export import write_cells_geojson

        print(f"wrote {write_cells_geojson(args.bundle)}")


def _common(p: argparse.ArgumentParser, default=None) -> None:
    """Options taken before and after the subcommand (a subcommand's ``default`` is SUPPRESS: it keeps
    what was given before it)."""
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if default is None else default,
        help="show tracebacks (and every other package's lines, as -v)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if default is None else default,
        help="show other packages' lines too (TensorFlow, squidpy, spatialdata, Dask's INFO)",
    )
    p.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=default,
        help="level of histo's and Dask's log lines (default: Dask's own, WARNING; INFO with -v)",
    )


def parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    from histo_sample.scene import TREATMENTS  # numpy and scipy only: `histo --help` stays quick

    p = argparse.ArgumentParser(
        prog="histo",
        description="Whole-slide analysis of synovial and lymph-node biopsies.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"histo {version('histo')}")
    _common(p)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="write a generated H&E slide with ground truth")
    s.add_argument("kind", choices=["lymph-node", "synovium"])
    s.add_argument("out", help="NAME.ome.tif; NAME.truth.parquet and NAME.truth.geojson are written beside it")
    s.add_argument("--size", type=int, default=4096, help="level-0 edge in px (default 4096)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mpp", type=float, default=0.5, help="µm per px (default 0.5)")
    s.add_argument(
        "--section",
        type=int,
        default=0,
        help="another section of the same tissue (same --seed: same patient; default 0, the first)",
    )
    s.add_argument(
        "--treatment",
        choices=TREATMENTS,
        help="build a treatment effect in (lymph node; belimumab: fewer, smaller follicles, thinner mantle, "
        "DOMAIN §3), e.g. for a post-treatment slide of a generated cohort",
    )
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
    r.add_argument("--overwrite", action="store_true", help="replace a bundle of the same name made from another input")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_run)

    b = sub.add_parser("batch", help="analyse a folder of slides or a sample sheet; summary and cohort tables")
    b.add_argument(
        "input", help="folder of slides, or CSV sample sheet: slide,patient,timepoint,tissue,stain[,workflow,mpp,…]"
    )
    b.add_argument(
        "--out", required=True, help="output folder: OUT/<slide name>/ per slide, OUT/summary.csv, OUT/cohort.csv"
    )
    b.add_argument(
        "--workflow",
        help="preset name or YAML file for every slide (default: the sheet's workflow "
        "column, else <tissue>-<stain>, else lymph-node-he)",
    )
    b.add_argument("--model", help="StarDist registry name, shipped model name or model folder")
    b.add_argument(
        "--mpp",
        type=float,
        help="µm per px of level 0 for every slide (default: the sheet's mpp column, else the file's)",
    )
    cluster = b.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")
    cluster.add_argument(
        "--scheduler",
        help="address of an existing dask.distributed scheduler (tls://host:8786; its TLS credentials "
        "in Dask's config: README, On several machines)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_batch)

    t = sub.add_parser("train", help="train a StarDist model on image/mask pairs")
    t.add_argument("images", help="folder of RGB images (TIFF/PNG)")
    t.add_argument("masks", help="folder of instance masks with the same file stems")
    t.add_argument("--out", required=True, help="model folder to write (resumes if it holds a checkpoint)")
    t.add_argument(
        "--image-mpp", required=True, help="µm per px of the images: one number, or a CSV with columns image,mpp"
    )
    t.add_argument("--licence", help="licence of these images (goes into the model card)")
    t.add_argument(
        "--data",
        nargs=4,
        action="append",
        metavar=("IMAGES", "MASKS", "MPP", "LICENCE"),
        help="another folder pair with its pixel size (number or CSV) and licence; repeatable",
    )
    t.add_argument(
        "--draws",
        type=int,
        nargs="+",
        metavar="N",
        help="how often each dataset's images are drawn for training patches relative to the others, one whole "
        "number per dataset (the positional one, then each --data; default 1 each): weights a small dataset up",
    )
    t.add_argument("--mpp", type=float, default=0.25, help="µm per px the model works at (default 0.25)")
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--steps", type=int, default=100, help="steps per epoch")
    t.add_argument("--patch", type=int, default=256, help="patch edge, px")
    t.add_argument("--batch", type=int, default=4, help="patches per step")
    t.add_argument(
        "--learning-rate",
        type=float,
        help="Adam's rate (default 3e-4); when resuming, replaces the saved rate from now on",
    )
    t.add_argument(
        "--stain-scale",
        type=float,
        help="H and E stain jitter strength (default 0.2 = ×0.8–×1.2); when resuming, "
        "applies from now on and restarts best-weights tracking",
    )
    t.add_argument(
        "--scale-jitter",
        type=float,
        help="zoom jitter of half the patches (default 0.1 = ×0.9–×1.1); when resuming, applies from now on "
        "and restarts best-weights tracking",
    )
    t.add_argument(
        "--hue-jitter",
        type=float,
        help="HSV hue turn of 70 %% of the patches, fraction of the colour circle (default 0: none; 0.04 = ±14°); "
        "when resuming, applies from now on",
    )
    t.add_argument(
        "--saturation-jitter",
        type=float,
        help="HSV saturation jitter of 70 %% of the patches (default 0: none; 0.6 = ×0.4–×1.6); "
        "when resuming, applies from now on",
    )
    t.add_argument(
        "--haze",
        type=float,
        help="hematoxylin OD added to every stained pixel of the stain-jittered patches, at most "
        "(default 0: none; 0.25 = +0–0.25); when resuming, applies from now on",
    )
    t.add_argument("--val-fraction", type=float, default=0.15, help="share of images held out (by image)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep weights_last.h5 and train_state.json so the run can be extended later",
    )
    t.add_argument("--note", action="append", help="a line for the model card; repeatable")
    t.add_argument("--init", help="model folder to start from (fine-tuning: its architecture and weights)")
    t.add_argument(
        "--filter-base",
        type=int,
        help="filters of the U-Net's first level (default 32; each level doubles them). A new run only: --init "
        "and resuming keep the saved architecture",
    )
    t.add_argument(
        "--conv-after",
        type=int,
        help="filters of the convolution after the U-Net (default 128). With --filter-base 16 and --conv-after 64 "
        "the network costs about a third per pixel on a CPU. A new run only",
    )
    t.add_argument(
        "--nms-threshs",
        type=float,
        nargs="+",
        default=[0.3, 0.4, 0.5],
        help="NMS thresholds tried when the thresholds are optimised (default 0.3 0.4 0.5)",
    )
    t.set_defaults(func=_train)

    c = sub.add_parser("train-classes", help="train the H&E nucleus classifier of a model from typed nuclei")
    c.add_argument("images", help="folder of RGB images (TIFF/PNG)")
    c.add_argument("masks", help="folder of instance masks with the same file stems")
    c.add_argument(
        "types",
        help="CSV tile,label,type: a type per nucleus (lymphocyte/inflammatory, epithelial, stromal/spindle, other); "
        "or a folder of class masks (a class value per pixel, same file stems; with --class-values)",
    )
    c.add_argument(
        "--class-values",
        nargs="+",
        metavar="VALUE=TYPE",
        help="with class masks: the type of each pixel value, e.g. 1=epithelial 2=lymphocyte 3=other 4=lymphocyte "
        "(a nucleus takes the value covering most of it; other values are left out)",
    )
    c.add_argument("--model", required=True, help="nucleus model folder to add the classifier to")
    c.add_argument("--image-mpp", required=True, help="µm per px of the images (one number)")
    c.add_argument("--licence", help="licence of these images (goes into the model card)")
    c.add_argument("--epochs", type=int, default=30)
    c.add_argument("--val-fraction", type=float, default=0.15, help="share of tiles held out (by tile)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--filters",
        type=int,
        nargs="+",
        help="filters of the classifier's four conv blocks (default 16 32 64 128); fewer cost less per nucleus",
    )
    c.add_argument(
        "--stain",
        choices=["macenko", "macenko-unscaled", "none"],
        default="macenko",
        help="how each tile's patches are read: Macenko's stain standardisation (default), its colours only "
        "(stain amounts kept), or as they are",
    )
    c.add_argument(
        "--add",
        action="store_true",
        help="add this network to the model's classifier as another member (probabilities averaged) "
        "instead of replacing it",
    )
    c.add_argument(
        "--inference-turns",
        type=int,
        choices=[1, 2, 4],
        default=4,
        help="turns of each patch the tile task averages for this network (4: only for nuclei the upright "
        "view leaves unsure; 1: the upright view alone, a quarter of the cost at most)",
    )
    c.set_defaults(func=_train_classes)

    e = sub.add_parser("evaluate", help="score nuclei against annotated images (F1, PQ, AJI)")
    e.add_argument("truth", help="folder of truth instance masks (.tif/.png) or QuPath GeoJSON nucleus outlines")
    e.add_argument("--out", required=True, help="folder for scores.csv (and bundles/ with --images)")
    e.add_argument("--bundles", help="folder of histo bundles named like the truth files")
    e.add_argument("--pred", help="folder of predicted label masks or GeoJSON outlines named like the truth files")
    e.add_argument("--images", help="folder of the annotated images: histo run them first (into OUT/bundles)")
    e.add_argument("--mpp", help="with --images: µm per px, one number or a CSV with columns image,mpp")
    e.add_argument("--model", help="with --images: model instead of the workflow's")
    e.add_argument("--workflow", default="lymph-node-he", help="with --images: preset name or YAML file")
    e.add_argument(
        "--record",
        metavar="DATASET",
        help="with --model FOLDER: add the pooled scores under this name to the model's card.json and MODEL.md",
    )
    e.add_argument(
        "--types",
        help="CSV tile,label,type of the true nuclei: per-class F1 (matched and both say the "
        "class) in scores.csv, the confusion matrix in confusion.csv",
    )
    e.add_argument("--iou", type=float, default=0.5, help="IoU at which a nucleus counts as found (default 0.5)")
    e.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")
    e.add_argument("--scheduler", help="address of an existing dask.distributed scheduler")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_evaluate)

    x = sub.add_parser("export", help="write a bundle in other tools' formats: SpatialData, QuPath detections")
    x.add_argument("bundle", help="a histo bundle folder (OUT/<slide name>)")
    x.add_argument(
        "--spatialdata",
        action="store_true",
        help="BUNDLE/spatialdata.zarr: labels, nuclei and regions (µm), the cells table (spatialdata.read_zarr)",
    )
    x.add_argument(
        "--qupath-cells",
        action="store_true",
        help="BUNDLE/cells.geojson: nuclei as QuPath detections classified by cell type (File > Import objects)",
    )
    x.set_defaults(func=_export)

    for s in sub.choices.values():
        _common(s, argparse.SUPPRESS)
        s.epilog, s.formatter_class = EXIT_CODES, argparse.RawDescriptionHelpFormatter
        if any("--scheduler" in a.option_strings for a in s._actions):
            s.add_argument(
                "--scheduler-file",
                help="a Dask scheduler file (dask scheduler --scheduler-file, dask-mpi, "
                "dask-jobqueue) instead of --scheduler; without either, "
                "DASK_SCHEDULER_ADDRESS, else a LocalCluster",
            )
    return p


def _setup_output(args) -> None:
    """Logging and the other packages' noise as asked: quiet unless -v / --debug (HISTO_VERBOSE reaches
    the Dask workers: histo.run.cluster)."""
    from histo.run.cluster import quiet_process  # imports distributed, whose logging setup comes before ours

    loud = args.verbose or args.debug
    if loud:
        os.environ["HISTO_VERBOSE"] = "1"
    else:
        quiet_process()
    if loud or args.log_level:
        level = args.log_level or "INFO"
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        for name in ("histo", "distributed"):
            logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    # docrep (under squidpy) warns about its own docstrings on import: noise before our one line
    warnings.filterwarnings("ignore", category=SyntaxWarning, module="docrep")
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    _setup_output(args)
    if getattr(args, "scheduler_file", None) and not getattr(args, "scheduler", None):
        from histo.run.cluster import scheduler_address

        try:
            args.scheduler = scheduler_address(None, args.scheduler_file)
        except HistoError as exc:
            print(f"histo: error: {exc}", file=sys.stderr)
            return EXIT_INPUT_ERROR
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
