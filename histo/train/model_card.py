"""``MODEL.md``: a model folder's ``card.json`` in prose (data and licences, pixel size, architecture,
training, validation and evaluation scores, the nucleus classifier).

Written by ``histo train`` (:func:`histo.train.outlines.write_card`), and again by ``histo
train-classes`` and ``histo evaluate --record`` after they add to the card.
"""

from __future__ import annotations

import json
from pathlib import Path

from histo.io.files import atomic_write, read_json
from histo.segment.nucleus_classes import ALONE, SURE, TURNS, classifier_members
from histo.train.config import TrainConfig

__all__ = ["model_md", "write_model_md", "STAIN_WORDS"]


_OPTIONAL_AUGMENTATION = {  # settings off by default: their words in the card, when a run used them
    "haze": "up to +{} hematoxylin OD on stained pixels",
    "hue_shift": "HSV hue ±{}",
    "saturation_range": "HSV saturation ×(1 ± {})",
}


def _until(changes: list[dict], sign: str = "") -> str:
    """`` (±0.1 until epoch 7)`` for each recorded change of a setting: the value it had before."""
    return "".join(f" ({sign}{c['from']} until epoch {c['epoch']})" for c in changes)


def _optional_augmentation_text(t: dict) -> str:
    """The card's words for the augmentations a run switched on (none for runs without them)."""
    parts = []
    for key, words in _OPTIONAL_AUGMENTATION.items():
        value, changes = float(t["augmentation"].get(key, 0)), t.get(f"{key}_changes", [])
        if value or changes:
            parts.append(words.format(value) + _until(changes))
    return "".join(f", {p}" for p in parts)


def model_md(card: dict) -> str:
    """``MODEL.md``'s text for a model's ``card.json`` contents."""
    t, v = card["training"], card.get("validation", {})
    arch = card["architecture"]
    lines = [
        f"# {card['name']} — StarDist nucleus model for {card['stain'].upper()} (RGB)",
        "",
        f"A StarDist 2D model (`stardist {card['versions'].get('stardist', '?')}`, `csbdeep "
        f"{card['versions'].get('csbdeep', '?')}`) that segments nuclei in RGB H&E images at "
        f"**{card['mpp']} µm/px**. Images at any other pixel size must be resampled to "
        f"{card['mpp']} µm/px before prediction (histo's pipeline does this).",
        "",
        "## Input",
        "",
        f"- Pixel size: {card['mpp']} µm/px.",
        f"- Normalisation: fixed, `x / 255` on uint8 RGB (`{json.dumps(card['normalize'])}`). It does not "
        "depend on the tile, so a slide cut into tiles gives the same result as the whole image.",
        f"- Largest expected nucleus: {card['max_nucleus_um']} µm (the tile halo is at least its radius; "
        "99.9 % of the training nuclei are shorter; the longest outline is "
        f"{card.get('max_nucleus_um_observed', '?')} µm).",
        f"- Thresholds: prob {card['thresholds'].get('prob')}, nms {card['thresholds'].get('nms')} "
        "(optimised on the validation images with `optimize_thresholds`).",
        "",
        "## Architecture",
        "",
        f"U-Net depth {arch['unet_n_depth']}, {arch['unet_n_filter_base']} base filters, "
        f"{arch.get('net_conv_after_unet', TrainConfig.net_conv_after_unet)} filters after it, "
        f"{arch['n_rays']} rays, grid {tuple(arch['grid'])}, {arch['n_channel_in']} input channels "
        f"({arch.get('n_params', '?')} parameters).",
        "",
        "## Training",
        "",
        f"- Data: {t['n_images']} images ({t['n_train']} training, {t['n_val']} validation, split by "
        f"image with seed {t['seed']}).",
    ]
    for s in t.get("sources", []):
        extra = f" — {s['note']}" if s.get("note") else ""
        extra += f"; drawn {s['draws']}× as often as a draws-1 image" if s.get("draws", 1) != 1 else ""
        lines.append(
            f"  - {s.get('name')}: {s.get('n_images', '?')} images, licence: {s.get('licence', 'unknown')}{extra}"
        )
    lines += [
        f"- {t['epochs']} epochs × {t['steps_per_epoch']} steps, batch {t['batch_size']}, patches "
        f"{t['patch_size']}², learning rate {t['learning_rate']} (Adam, halved on plateau"
        + "".join(f"; set to {c['to']} after epoch {c['epoch']}" for c in t.get("learning_rate_changes", []))
        + ").",
        f"- Augmentation: flips and 90° rotations, H and E stain jitter in optical-density space "
        f"(Ruifrok vectors, concentrations ×(1 ± {t['augmentation'].get('stain_scale', '?')})"
        + "".join(f"; ±{c['from']} until epoch {c['epoch']}" for c in t.get("stain_scale_changes", []))
        + f"), brightness/contrast, ±{int(round(t['augmentation'].get('scale_range', 0) * 100))} % scale jitter"
        + _until(t.get("scale_range_changes", []), "±")
        + _optional_augmentation_text(t)
        + ", Gaussian noise.",
        f"- Wall time: {t['wall_time_s']:.0f} s on {t.get('machine', '?')}.",
    ]
    if t.get("validation_patches"):
        lines.append(
            f"- Best weights: the lowest validation loss ({t.get('best_val_loss')}), taken on patches of a "
            f"{t['validation_patches']}" + _until(t.get("validation_patches_changes", [])) + "."
        )
    if t.get("command"):
        cmd = str(t["command"])
        lines += ["- Command:", "", "```", cmd, "```"] if "\n" in cmd else [f"- Command: `{cmd}`"]
    lines += ["", "## Validation (held-out images, IoU ≥ 0.5)", ""]
    if v:
        lines += [
            f"F1 {v.get('f1')}, precision {v.get('precision')}, recall {v.get('recall')} "
            f"({v.get('n_true')} true nuclei, {v.get('n_pred')} predicted, mean matched IoU "
            f"{v.get('mean_matched_score')}, panoptic quality {v.get('panoptic_quality')}).",
        ]
    else:
        lines.append("Not evaluated.")
    evals = card.get("evaluations") or []
    if evals:
        lines += [
            "",
            "## Evaluation on annotated images never used for training (`histo evaluate`)",
            "",
            "Pooled over the images; nuclei matched at IoU ≥ 0.5; PQ = panoptic quality, AJI = aggregated "
            "Jaccard index.",
            "",
            "| dataset | images | true nuclei | precision | recall | F1 | mean IoU | PQ | AJI |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for ev in evals:
            sc = ev["pooled"]
            lines.append(
                f"| {ev['dataset']} | {ev['n_images']} | {sc['n_true']} | {sc['precision']:.3f} | "
                f"{sc['recall']:.3f} | {sc['f1']:.3f} | {sc['mean_iou']:.3f} | {sc['pq']:.3f} | {sc['aji']:.3f} |"
            )
        typed = [ev for ev in evals if any(k.startswith("f1_") for k in ev["pooled"])]
        for ev in typed:
            lines += [
                "",
                f"Per-class F1 on {ev['dataset']} (matched at IoU ≥ 0.5 and both say the class): "
                + ", ".join(f"{k[3:]} {v:.3f}" for k, v in sorted(ev["pooled"].items()) if k.startswith("f1_"))
                + ".",
            ]
        lines += [""] + [f"- {ev['dataset']}: `{ev['command']}`" for ev in evals if ev.get("command")]
    if card.get("nucleus_classes"):
        lines += _classes_md(card["nucleus_classes"])
    if card.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card["notes"]]
    licences = sorted({s.get("licence", "unknown") for s in t.get("sources", [])})
    lines += [
        "",
        "## Licence of the training data",
        "",
        "This model was trained on: " + (", ".join(licences) if licences else "unknown") + ". "
        "A model inherits the obligations of its training data (e.g. CC BY-NC-SA: "
        "non-commercial use, attribution, share-alike).",
        "",
    ]
    return "\n".join(lines)


STAIN_WORDS = {
    "macenko": "each tile's H&E mapped to Macenko's reference stain vectors and concentrations",
    "macenko-unscaled": "each tile's H&E mapped to Macenko's reference stain vectors, its stain amounts kept",
    None: "the pixels as they are",
}


def _classes_md(c: dict) -> list[str]:
    """The model card's section on the nucleus classifier (histo.train.classes)."""
    members = classifier_members(c)
    files = ", ".join(f"`{m['file']}`" for m in members)
    lines = [
        "",
        "## Nucleus classes",
        "",
        f"A separate classifier ({files}, histo.segment.nucleus_classes"
        + (
            f"; {len(members)} networks whose class probabilities are averaged, the networks after the first "
            f"run only for nuclei to which the first gives no class ≥ {ALONE}"
            if len(members) > 1
            else ""
        )
        + f") gives every nucleus one of {', '.join(c['classes'])} from a {c.get('patch_px')}² patch at "
        f"{c.get('patch_mpp')} µm/px and the nucleus outline; histo's typing keeps the class and splits off "
        "large pale nuclei (`large`).",
    ]
    for m in members:
        head = f"`{m['file']}`: " if len(members) > 1 else ""
        lines.append(
            f"- {head}Stains: {STAIN_WORDS.get(m.get('stain'), m.get('stain'))} before its patches are cut, in "
            "training and in the tile task (histo.segment.nucleus_classes.standardise_stain)."
        )
        turns = int(m.get("inference_turns", TURNS))
        lines.append(
            f"- {head}Inference: the upright patch alone."
            if turns == 1
            else f"- {head}Inference: class probabilities averaged over {turns} turns of the patch, except for "
            f"nuclei whose upright view already gives a class ≥ {m.get('inference_sure', SURE)}."
        )
        for src in m.get("sources", []):
            lines.append(
                f"- {head}Data: {src['name']} ({src['n_tiles']} tiles at {src['mpp']} µm/px), "
                f"licence: {src['licence']}."
            )
        if m.get("n_train_nuclei"):
            lines.append(
                f"- {head}{m['n_train_nuclei']} training nuclei ({m.get('train_counts')}), {m['n_val_nuclei']} "
                f"validation nuclei in the validation tiles {', '.join(m.get('val_tiles', []))}; best epoch "
                f"{m.get('best_epoch')} of {m.get('epochs_run')}; {m.get('wall_time_s', 0):.0f} s."
            )
        lines += _validation_md(m.get("validation", {}), c["classes"], f"{head}Validation on the expert outlines")
        if m.get("command"):
            lines.append(f"- {head}Command: `{m['command']}`")
    if len(members) > 1:
        lines += _validation_md(c.get("validation", {}), c["classes"], "Together, on the same validation tiles")
    return lines


def _validation_md(v: dict, classes: list[str], what: str) -> list[str]:
    if not v:
        return []
    scores = ", ".join(f"{k} {v[k]['f1']}" for k in classes if k in v)
    return [f"- {what} (class only, upright patches): accuracy {v['accuracy']}; F1 {scores}."]


def write_model_md(folder: Path | str) -> Path:
    """(Re)write ``MODEL.md`` from ``card.json`` (e.g. after adding an evaluation to the card)."""
    folder = Path(folder)
    atomic_write(folder / "MODEL.md", model_md(read_json(folder / "card.json")))
    return folder / "MODEL.md"
