"""The "Reference run" section of ``docs/results.md`` from ``RUN/results.json``'s ``reference`` rows."""

from __future__ import annotations

import argparse
import math

from claims import curves, machine, spread
from claims.reference import ARMS, MAIN, PAPER_TAU, REF_ARMS, SEEDS, unfinished

SECTION = "reference-run"


def _plateau(label: str, row: dict | None, key: str = "plateau") -> str:
    if row is None:
        return f"| {label} | (not finished) | |"
    return f"| {label} | {row['steps']} | {curves.describe(row[key])} |"


def _training(rows: dict) -> list[str]:
    lines = ["### Training to a plateau", "",
             "Validation on a held-out 2% of the training images every steps / 6; the last two values and "
             "their relative change (the classifier validates only at its end: its training loss instead).",
             "", "| model | steps | last two values, relative change |", "|---|---|---|",
             _plateau("RQ-VAE, val PSNR (dB) at full depth", rows.get("vae")),
             _plateau("RQ-VAE, val reconstruction MSE", rows.get("vae"), "plateau_loss"),
             _plateau("classifier, training loss", rows.get("classifier"))]
    for arm in ARMS:
        lines.append(_plateau(f"RQ-Transformer {arm}, val bits per code", rows.get(f"ar/{arm}")))
    return lines


def _main_results(rows: dict, args: argparse.Namespace) -> list[str]:
    tau = rows.get(f"ar/{MAIN}", {}).get("temperature")
    lines = ["", "### The main model (soft labels + stochastic sampling, seed 0"
             + (f", temperature {tau:g})" if tau is not None else ")"), ""]
    s, clf = rows.get(f"samples/{MAIN}"), rows.get("classifier")
    if clf:
        lines.append(f"Classifier accuracy on the real test images: {clf['test_accuracy']:.4f}.")
    if s:
        lines += [f"FID of {s['samples']} class-balanced samples against {s['reference_images']} test "
                  "images: "
                  f"**{s['fid']:.2f}**; floor ({s['samples']} training images against the same test "
                  f"images): {s['floor']:.2f}; FID - floor {s['fid'] - s['floor']:.2f}. Classifier "
                  f"accuracy on the samples (each judged against the class asked for): "
                  f"**{s['accuracy']:.4f}**.", "", "![samples per class](img/reference_samples.png)"]
    for key, other in rows.items():  # other arms sampled at the main model's size (an earlier main model)
        if key.startswith("samples/") and key != f"samples/{MAIN}" and other["samples"] == args.samples:
            arm = key.split("/", 1)[1]
            lines += ["", f"The arm {arm} (temperature {rows[f'ar/{arm}']['temperature']:g}), "
                      f"{other['samples']} samples the same way: FID {other['fid']:.2f}, classifier accuracy "
                      f"{other['accuracy']:.4f}."]
    r = rows.get("recon")
    if r:
        lines += ["", f"Tokenizer on {r['images']} test images (rFID: the test images against their "
                  f"reconstructions from the first d codes; floor: {r['images']} training images against the "
                  f"same test images = **{r['floor']:.2f}**):", "",
                  "| depth d | PSNR (dB) | SSIM | rFID | rFID - floor |", "|---|---|---|---|---|"]
        lines += [f"| {p['depth']} | {p['psnr']:.2f} | {p['ssim']:.4f} | {p['rfid']:.2f} | "
                  f"{p['rfid'] - r['floor']:.2f} |" for p in r["per_depth"]]
        lines += ["", "![coarse to fine](img/reference_coarse_to_fine.png)"]
    return lines


def _arm_values(rows: dict, name: str) -> tuple[list[float], list[float], float | None]:
    fids, accs, floor = [], [], None
    for seed in SEEDS:
        s = rows.get(f"samples/{name}-s{seed}")
        if s is None:
            continue
        a = s.get("ablation", s)
        fids.append(a["fid"])
        accs.append(a["accuracy"])
        if "ablation" not in s:
            floor = s["floor"]
    return fids, accs, floor


def _label(rows: dict, name: str) -> str:
    tau = rows.get(f"ar/{name}-s{SEEDS[0]}", {}).get("temperature")
    soft = REF_ARMS[name]["soft_labels"] and tau is not None
    return f"{name.split('-tau')[0]} (tau {tau:g})" if soft else name


def _ablation(rows: dict, args: argparse.Namespace) -> list[str]:
    lines = ["", f"### Table 2's ablation ({args.ablation_samples} samples per arm, two seeds each)", "",
             f"FID of {args.ablation_samples} class-balanced samples against the same {args.ref} test images "
             "(the seed-0 soft + stochastic arm is the main model: its first samples); mean +- half the "
             "seed-to-seed range (with two seeds, the two values). Soft-label arms at the demo's temperature "
             f"and at the paper's ({PAPER_TAU:g}).", "",
             "| training | FID per seed | FID | classifier accuracy | floor |", "|---|---|---|---|---|"]
    values = {}
    for name in REF_ARMS:
        fids, accs, floor = _arm_values(rows, name)
        values[name] = (fids, accs)
        if fids:
            floor_s = f"{floor:.2f}" if floor is not None else ""
            per_seed = ", ".join(f"{v:.2f}" for v in fids)
            lines.append(f"| {_label(rows, name)} | {per_seed} | {spread.fmt(fids)} | "
                         f"{spread.fmt(accs, 4)} | {floor_s} |")
    fa, aa = values["hard+greedy"]
    for soft in (n for n in REF_ARMS if REF_ARMS[n]["soft_labels"]):
        fb, ab = values[soft]
        if not len(fa) == len(fb) == len(SEEDS):
            continue
        for what, a, b, lower, digits in (("FID", fa, fb, True, 2), ("accuracy", aa, ab, False, 4)):
            diff, verdict = spread.compare(a, b, lower_is_better=lower)
            verdict = verdict.replace("b better", f"{_label(rows, soft)} better (the paper's claim)") \
                .replace("a better", "hard + greedy better (against the paper)")
            lines.append(f"\n{what}: {_label(rows, soft)} minus hard + greedy = {diff:+.{digits}f}; "
                         f"verdict: **{verdict}**.")
    return lines


def _soft_labels(row: dict | None) -> list[str]:
    if row is None:
        return []
    k = row["codebook_size"]
    trained = row["trained_temperatures"]
    taus = " and ".join(f"{t:g}" for t in trained)
    lines = ["", "How soft the targets were: the soft-label arms trained with stochastic codes at "
             f"temperature {taus}. Q_tau on the latents of {row['images']} test images, per depth d = 1..D: "
             f"the mean entropy of the targets (uniform over K = {k}: {math.log2(k):.2f} bits) and the share "
             "of positions whose drawn code is the greedy one:",
             "", "| temperature | target entropy, bits | drawn code = greedy code |", "|---|---|---|"]
    for tau, st in row["by_temperature"].items():
        mark = " (trained)" if float(tau) in trained else ""
        lines.append(f"| {tau}{mark} | {' / '.join(f'{e:.2f}' for e in st['entropy_bits'])} | "
                     f"{' / '.join(f'{100 * g:.0f}%' for g in st['greedy_share'])} |")
    return lines


def section(results: dict, args: argparse.Namespace) -> str:
    rows = results.get("reference", {})
    sessions = results.get("reference_sessions") or [{}]
    m = sessions[0]
    missing = unfinished(rows)
    lines = ["## Reference run (Fashion-MNIST, trained to a plateau)", "",
             "Measured by `benchmarks/fmnist_reference.py`:", "", f"    {m.get('command', '?')}", "",
             f"Machine: {machine.describe(m) if m else '?'}. Started {m.get('started', '?')}; "
             f"last update {results.get('reference_updated', '?')}. Recipe: the demo's (`DemoConfig` "
             f"defaults, stage 1 `{rows.get('vae', {}).get('recipe', '?')}`), longer."]
    if len(sessions) > 1:
        lines += ["", "Continued (the same folder; finished pieces are kept): " + "; ".join(
            f"{s.get('started', '?')}, {s.get('workers', '?')} worker(s) x {s.get('torch_threads', '?')} "
            f"thread(s): `{s.get('command', '?')}`" for s in sessions[1:]) + "."]
    if missing:
        lines += ["", f"**Partial: still running or not yet started: {', '.join(missing)}.**"]
    lines += [""] + _training(rows) + _main_results(rows, args) + _ablation(rows, args)
    lines += _soft_labels(rows.get("soft-labels"))
    lines += ["", "Wall time per piece (s): " + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in rows.items())]
    total, workers = sum(v["seconds"] for v in rows.values()), m.get("workers") or 1
    lines += ["", f"In all {total:.0f} s of worker time (the pieces summed; a piece that shared the machine "
              f"with other jobs took longer): about {total / workers / 3600:.1f} h of wall time with "
              f"{workers} worker processes."]
    return "\n".join(lines) + "\n"
