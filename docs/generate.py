"""Generated parts of the docs site, rendered at build time by `docs/hooks.py` (never committed).

A page asks for generated text with a marker line, replaced when the site is built:

    <!-- generate: cli -->                         the CLI reference, walked from the typer app
    <!-- generate: bench heads.json -->            tables of benchmarks/results/heads.json
    <!-- generate: include CHANGELOG.md -->        a file of the repository, as markdown
    <!-- generate: include configs/x.toml toml --> a file of the repository, as a code block

A benchmark file that is absent renders as a note saying how to record it; a file that lacks a key its renderer reads
fails the build (KeyError naming the file), so the tables never drift from the results silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

MARKER = re.compile(r"^<!-- generate: (?P<what>[^>]*?) -->$", re.MULTILINE)
TARGET_LABELS = ("Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g", "GDM_g", "Dry_Total_g")


class GenerateError(RuntimeError):
    """A marker or a results file the generator cannot render: the build must stop."""


# ---------------------------------------------------------------------------------------------- markdown helpers
def cell(text: object) -> str:
    """A markdown table cell: pipes escaped, `<`/`>` escaped outside code spans (metavars such as <path>)."""
    parts = str(text).replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if k % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for k, p in enumerate(parts))


def table(header: list[str], rows: list[list[object]], align: str = "") -> str:
    """A markdown table; `align` is one letter per column (l or r), left by default."""
    marks = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def size(wh: list[int]) -> str:
    return f"{wh[0]}x{wh[1]}"


# ---------------------------------------------------------------------------------------------- the CLI reference
def cli_reference() -> str:
    """Every command of `biomass_cache.cli.app`: help text, usage, arguments and options, from click's params."""
    import click
    from typer.main import get_command

    from biomass_cache.cli import app

    group = get_command(app)
    root = click.Context(group, info_name="biomass")
    out = ["## `biomass`", "", group.help or "", "", "```", f"biomass {' '.join(group.collect_usage_pieces(root))}", "```", "",
           params_table(group, root)]
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        ctx = click.Context(command, info_name=name, parent=root)
        out += ["", f"## `biomass {name}`", "", command.help or "", "", "```",
                f"biomass {name} {' '.join(command.collect_usage_pieces(ctx))}", "```", "", params_table(command, ctx)]
    return "\n".join(out)


def params_table(command, ctx) -> str:
    """One row per argument and option: its names and metavar, its default (or `required`), its help."""
    rows = []
    for p in command.get_params(ctx):
        record = p.get_help_record(ctx)
        if record is None or p.name == "help":
            continue
        rows.append([f"`{record[0]}`", default_text(p), getattr(p, "help", None) or ""])
    return table(["argument / option", "default", "meaning"], rows) if rows else "(no options)"


def default_text(p) -> str:
    if p.required:
        return "required"
    if isinstance(getattr(p, "show_default", None), str):
        return p.show_default
    if p.default is None or (getattr(p, "is_flag", False) and p.default is False and not p.secondary_opts):
        return ""
    if isinstance(p.default, bool):
        return (p.opts if p.default else p.secondary_opts)[0]
    return f"`{p.default}`"


# ---------------------------------------------------------------------------------------------- benchmark tables
def r2_rows(d: dict) -> str:
    """heads.json / heads_reduce.json: OOF competition_r2 and per-target R^2 of every contender, then the goals."""
    s = d["settings"]
    head = (f"{s['n_train']} synthetic training photos ({size(s['photo'])}), {s['backbone']}, input "
            f"{size(s['size'])}, blocks {s['layers']}, {s['views']} views, {s['folds']} grouped folds, "
            f"{s['epochs']} epochs, OOF on view {s['tta']}; {s['train_defaults']}.")
    rows = [[r["model"], f"{r['competition_r2']:.3f}", *(f"{r['per_target_r2'][t]:.3f}" for t in TARGET_LABELS)]
            for r in d["rows"]]
    goals = [[k, f"{g['margin']:+.3f}", f">= {g['goal']:+.3f}", "yes" if g["met"] else "**no**"]
             for k, g in d["goals"].items()]
    return "\n\n".join([head, table(["model", "competition_r2", *(f"R2 {t[:-2]}" for t in TARGET_LABELS)], rows,
                                    "lrrrrrr"),
                        table(["goal", "margin", "needed", "met"], goals, "lrrl"), machine_line(d)])


def transfer_rows(d: dict) -> str:
    """heads_transfer.json: OOF competition_r2 of every model in every (style, seed, size) cell, each cell with its
    own data and folds, and per model the mean and the worst margin over the colour-statistics ridge."""
    s = d["settings"]
    head = (f"One cell per generator style {s['styles']} x seed {s['seeds']} x training size {s['sizes']} (synthetic "
            f"{size(s['photo'])} photos), each with its own data, cache and {s['folds']} grouped folds that every row "
            f"of the cell shares; {s['backbone']}, input {size(s['size'])}, blocks {s['layers']}, {s['views']} views, "
            f"{s['epochs']} epochs, OOF on view {s['tta']}; {s['train_defaults']}. Colour ridge: "
            f"{s['colour_stats']} colour statistics per photo (`biomass_cache/train/baseline.py`)."
            + (" **A quick (smoke) run: not a measurement.**" if s["quick"] else "")
            + (f" **Cut short: {s['cells_done']} of {s['cells_planned']} cells.**"
               if s.get("cells_done", 0) < s.get("cells_planned", 0) else ""))
    cells = d["cells"]
    header = ["model", *(f"{c['style']} s{c['seed']}, {c['n_train']}" for c in cells), "mean",
              "worst margin over colour ridge"]
    rows = []
    for model, m in d["summary"].items():
        per_cell = [{r["model"]: r["competition_r2"] for r in c["rows"]}[model] for c in cells]
        worst = m["worst_margin_vs_colour"]
        rows.append([model, *(f"{v:.3f}" for v in per_cell), f"{m['mean']:.3f}",
                     "" if worst is None else f"{worst:+.3f}"])
    parts = [head, table(header, rows, "l" + "r" * (len(header) - 1))]
    if d["skipped"]:
        parts.append("Not run: " + "; ".join(f"{k} ({v})" for k, v in d["skipped"].items()) + ".")
    return "\n\n".join([*parts, machine_line(d)])


def techniques_rows(d: dict) -> str:
    """heads_techniques.json: every technique beside the density head and the colour-statistics ridge, same folds."""
    s = d["settings"]
    head = (f"{s['n_train']} synthetic training photos ({size(s['photo'])}, the `full` preset's photos and folds) and "
            f"{s['n_test']} test photos for the pseudo-labels; {s['backbone']}, input {size(s['size'])}, blocks "
            f"{s['layers']}, {s['views']} views, {s['folds']} grouped folds, {s['epochs']} epochs, OOF on view "
            f"{s['tta']}; {s['train_defaults']}. Colour ridge: {s['colour_stats']} colour statistics per photo. A "
            f"blank per-target cell: the cross-fitted stack reports only its pooled score."
            + (" **A quick (smoke) run: not a measurement.**" if s["quick"] else ""))
    rows = [[r["model"], f"{r['competition_r2']:.3f}", f"{d['margin_vs_density'][r['model']]:+.3f}",
             f"{d['margin_vs_colour'][r['model']]:+.3f}",
             *((f"{r['per_target_r2'][t]:.3f}" for t in TARGET_LABELS) if r["per_target_r2"] else [""] * 5)]
            for r in d["rows"]]
    notes = [f"{r['model']}: its tokens differ from the whole view's by {r['token_change_vs_whole_view']:.1e} "
             "(mean absolute difference over mean absolute token)." for r in d["rows"]
             if "token_change_vs_whole_view" in r]
    return "\n\n".join([head, table(["model", "competition_r2", "vs density head", "vs colour ridge",
                                      *(f"R2 {t[:-2]}" for t in TARGET_LABELS)], rows, "lrrrrrrrr"),
                         f"Seed spread of the density head (seeds {d['density_seeds']}, same folds, max - min): "
                         f"{d['density_seed_spread']:.3f}; a difference smaller than that is noise.",
                         *notes, machine_line(d)])


def extract_rows(d: dict) -> str:
    """extract*.json: the extraction loop over the bare backbone forward (median of adjacent pairs), bytes per view."""
    ratios = d["pair_ratios"]
    head = (f"{d['backbone']} ({d['weights']} weights), input {size(d['size'])} from {size(d['photo_size'])} "
            f"photos, {d['images']} images x {d['views']} views, layers {d['layers']}, batches of {d['batch_size']} "
            f"views, {d['workers']} workers, {d['torch_threads']} torch threads, {d['repeats']} adjacent pairs.")
    timing = table(["bare forward (s)", "extraction loop (s)", "loop / bare (median of pairs)", "single pairs",
                    "whole call / bare", "CPU s / bare", "views/s", "goal"],
                   [[f"{d['bare_forward_s']:.2f}", f"{d['extract_loop_s']:.2f}", f"**{d['overhead_ratio']:.3f}**",
                     f"{min(ratios):.2f} to {max(ratios):.2f}", f"{d['end_to_end_ratio']:.3f}",
                     f"{d['cpu_time_ratio']:.3f}", f"{d['views_per_s']:.2f}", f"<= {d['goal']}"]], "rrrlrrrl")
    sizes = table(["storage dtype", "bytes on disk per image-view"],
                  [[k, f"{v:,.0f}"] for k, v in d["bytes_per_image_view"].items()], "lr")
    return "\n\n".join([head, timing, sizes, machine_line(d)])


def malloc_rows(d: dict) -> str:
    """malloc.json: glibc's default malloc against the fixed thresholds, per measured workload."""
    head = (f"{d['backbone']} ({d['weights']} weights), {size(d['size'])}, batches of {d['batch_views']} views, "
            f"{d['views_per_pass']} views per pass, {d['passes_per_child']} passes in each of "
            f"{d['children_per_setting']} child processes per setting, {d['torch_threads']} torch threads.")
    rows = []
    for name, r in d["results"].items():
        for setting, s in r["settings"].items():
            rows.append([name, setting, f"{s['ms_per_view']:.1f}", f"{s['faults_per_view']:,.0f}",
                         f"{100 * s['kernel_share']:.1f} %", f"{s['max_rss_mb']:.0f} MB",
                         f"{r['speedup']:.3f}x" if setting == "tuned" else ""])
    return "\n\n".join([head, table(["measured", "malloc", "ms per view (median pass)", "minor faults per view",
                                     "kernel time / (wall x threads)", "peak RSS", "speed-up"], rows, "llrrrrr"),
                        machine_line(d)])


def store_rows(d: dict) -> str:
    """store.json: read speed against a raw memmap, write speed, bytes on disk per dtype and codec."""
    c = d["config"]
    head = (f"{c['n_images']} images x {c['views']} views, layers {c['layers']}, grid {c['grid']}, {c['channels']} "
            f"channels ({c['sample_MB_fp16']:.2f} MB per float16 sample), {c['reps']} reps, default layout "
            f"`{c['default_layout']}`. Method: {c['method']}.")
    default = f"store {c['default_layout']}"
    reads = sorted(d["reads"].items(), key=lambda kv: -kv[1]["vs_memmap"])
    read_rows = [[f"**{k} (default)**" if k == default else k, f"{r['median_samples_per_s']:.0f}",
                  f"{r['MB_per_s']:.0f}", f"{r['vs_memmap']:.2f}",
                  f"{min(r['vs_memmap_per_rep']):.2f} to {max(r['vs_memmap_per_rep']):.2f}",
                  f"{r['one_layer_samples_per_s']:.0f}", f"{r['one_layer_vs_memmap']:.2f}"] for k, r in reads]
    write_rows = [[k, f"{w['samples_per_s']:.0f}", f"{w['MB_per_s']:.0f}"] for k, w in d["writes"].items()]
    size_rows = [[k, f"{z['bytes_per_image_view'] / 1e6:.3f} MB", f"{z['ratio_vs_fp16_raw']:.2f}"]
                 for k, z in d["sizes"].items()]
    return "\n\n".join([
        head,
        table(["reader", "samples/s (median pass)", "MB/s", "vs memmap (median of per-rep ratios)", "per-rep ratios",
               "one layer, samples/s", "one layer vs memmap"], read_rows, "lrrrlrr"),
        table(["writer", "samples/s", "MB/s"], write_rows, "lrr"),
        table(["dtype / codec", "bytes per image-view", "ratio vs raw float16"], size_rows, "lrr"),
        f"{c['cpus']} CPUs, {c['platform']}, zarr {c['zarr']}, numpy {c['numpy']}; {c['seconds']:.0f} s."])


def speed_rows(d: dict) -> str:
    """speed.json: epoch time of a head from the cache against the same head with the backbone run live."""
    s = d["settings"]
    head = (f"{s['backbone']}, input {size(s['size'])} from {size(s['photo'])} photos, layers {s['layers']}, "
            f"{s['images']} images, batch {s['batch_size']}, {s['torch_threads']} torch thread(s), {s['device']}; "
            f"{s['heads']}. Median epoch after the first ({s['epochs']['cache']} cached, {s['epochs']['live']} live "
            f"epochs).")
    rows = [[r["head"], r["recipe"], f"{r['cache_epoch_s']:.2f}", f"{r['live_epoch_s']:.2f}",
             f"**{r['speedup']:.0f}x**" if r["speedup"] >= d["goal"] else f"{r['speedup']:.0f}x"] for r in d["rows"]]
    return "\n\n".join([head, table(["head", "recipe", "epoch from cache (s)", "epoch, backbone live (s)", "speed-up"],
                                    rows, "llrrr"),
                        f"Goal: >= {d['goal']:.0f}x (bold where met). One-off extraction of the cache: "
                        f"{d['extract_s']:.1f} s.", machine_line(d)])


def lora_rows(d: dict) -> str:
    """lora.json: LoRA epoch time, live backbone against the prefix cache and the frozen token cache."""
    head = (f"{d['backbone']}, input {size(d['size'])}, {d['images']} images, layers {d['layers']}, last "
            f"{d['adapted_blocks']} blocks adapted, batch {d['batch_size']}, {d['epochs']} epochs, "
            f"{d['torch_threads']} torch threads, {d['device']}.")
    rows = [[r["method"], f"{r['epoch_s']:.2f}", f"{r['build_s']:.1f}", f"{r['speedup_vs_live']:.1f}x"]
            for r in d["rows"]]
    return "\n\n".join([head, table(["method", "epoch (s)", "one-off build (s)", "speed-up vs live"], rows, "lrrr")])


def scale_rows(d: dict) -> str:
    """scale.json: the default 5-fold run on ViT-L / ViT-7B-shaped stores, full against reduced (`biomass reduce`)."""
    s = d["settings"]
    head = (f"Figures per {s['scaled_to']} images (a store of fewer images is scaled up: its `images` column); "
            f"{s['folds']} folds x {s['epochs']} epochs, batch {s['batch_size']}; {s['train']}, {s['reduce']}. "
            f"Tokens: {s['signal']}. Peak RSS is the child process's maxrss as Linux reports it, which counts the "
            f"benchmark process's resident memory when it starts the child: an upper bound."
            + (" **A quick (smoke) run: not a measurement.**" if s["quick"] else ""))
    stores, runs, steps = [], [], []
    for shape in d["shapes"]:
        red = shape["reduce"]
        stores.append([shape["shape"], shape["images"], f"{len(shape['layers'])} x {shape['grid']} x "
                       f"{shape['channels']}", f"{shape['store_gb']:.2f}", f"{len(shape['layers'])} x "
                       f"{shape['reduced_grid']} x {shape['reduced_channels']}", f"{shape['reduced_store_gb']:.3f}",
                       f"{red['wall_s_at_357'] / 60:.1f}", f"{red['peak_rss_gb']:.1f}"])
        for head_name, row in shape["heads"].items():
            full, reduced = row["full"], row["reduced"]
            runs.append([shape["shape"], head_name,
                         f"{full['epoch_s_at_357']:.1f} / {reduced['epoch_s_at_357']:.2f}",
                         f"{full['compute_limit_epoch_s']:.2f} / {reduced['compute_limit_epoch_s']:.2f}",
                         f"{full['bytes_read_per_epoch'] / 1e9:.1f} / {reduced['bytes_read_per_epoch'] / 1e9:.1f}",
                         f"{full['default_run_s_at_357'] / 60:.0f} ({full['default_run_s']})",
                         f"{reduced['with_reduce_s_at_357'] / 60:.1f} ({reduced['default_run_s']})",
                         f"**{row['speedup']:.1f}x**", f"{full['peak_rss_gb']:.1f} / {reduced['peak_rss_gb']:.1f}",
                         f"{reduced['oof_competition_r2']:.3f}"])
            steps += [[shape["shape"], head_name, arm, f"{a['step_ms_fp32']:.1f}", f"{a['step_ms_bf16_autocast']:.1f}",
                       f"{a['matmul_gflops_fp32']:.0f}", f"{a['matmul_gflops_bf16']:.0f}"]
                      for arm, a in (("full", full), ("reduced", reduced))]
    return "\n\n".join([
        head,
        table(["shape", "images", "store (layers x grid x channels)", "GB", "reduced", "GB",
               "biomass reduce (min)", "its peak RSS (GB)"], stores, "lrlrlrrr"),
        table(["shape", "head", "epoch s, full / reduced", "compute limit s/epoch, full / reduced",
               "GB read from disk per epoch, full / reduced", "default run, full (min)",
               "reduced run + reduce (min)", "speed-up", "peak RSS GB, full / reduced",
               "OOF competition_r2 (reduced, planted signal)"], runs, "llrrrrrrrr"),
        "One training step (batch 16, forward, backward, AdamW) of the head at its defaults, fp32 against CPU bf16 "
        "autocast, and the matmul throughput at the head's shape:",
        table(["shape", "head", "tokens", "step ms, fp32", "step ms, bf16 autocast", "matmul GFLOP/s, fp32",
               "matmul GFLOP/s, bf16"], steps, "lllrrrr"),
        machine_line(d)])


def reduce_rows(d: dict) -> str:
    """reduce.json / reduce_1core.json: `biomass reduce` now against the command of an earlier commit, side by side."""
    s, t = d["shape"], d["per_image_s"]
    head = (f"{d['what']}: {s['images']} images, {len(s['layers'])} layers x {s['grid'][0] * s['grid'][1]} tokens x "
            f"{s['channels']} channels; {d['machine']['cores']} core(s), before = commit {d['baseline']}, median of "
            f"{d['reps']} reps. {d['tokens']}.\n\n")
    rows = [f"| {arm} | {t[arm]['whole_s'] * 1e3:.0f} | {t[arm]['fit_s'] * 1e3:.0f} | {t[arm]['reduce_s'] * 1e3:.0f} | "
            f"{t[arm]['transform_per_view_s'] * 1e3:.1f} | {t[arm]['read_s'] * 1e3:.0f} |" for arm in t]
    return (head + "| arm | whole command | fit | reduce | transform, ms per view | reading alone |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows)
            + f"\n\nms per image unless said. Speed-up: {d['speedup_whole']:.2f}x the command, "
            f"{d['speedup_reduce']:.2f}x its reduction, {d['speedup_fit']:.2f}x its fit, {d['speedup_transform']:.2f}x the transform; largest "
            f"difference from the earlier order under one projection {d['max_abs_difference']:.1e} (values up to "
            f"{d['max_abs_value']:.1f}: float16 rounding).\n")


def host_rows(d: dict) -> str:
    """host.json: stage one's host pipeline with a stand-in backbone at the real shape: full store and --reduce."""
    s, m = d["settings"], d["machine"]
    head = (f"{s['images']} {s['photos']} photos x {s['views']} views at {size(s['size'])}, {s['layers']} layers x "
            f"{s['channels']} channels, batch {s['batch_size']}, {s['workers']} decoders; {d['backbone']}. This "
            f"disk: {d['disk_write_bytes_per_s'] / 1e9:.2f} GB/s (plain writes + fsync, same run).")
    names = sorted({k for r in d["arms"].values() for k in r["stages_s"]})
    rows = [[arm, f"{r['views_per_s']:.1f}", f"{r['views_per_s_per_core']:.1f}",
             f"{r['bytes_per_view'] / 1e6:.3f}", f"{r['write_bytes_per_s'] / 1e9:.3f}",
             *[f"{r['stages_s'].get(n, 0):.2f}" for n in names]] for arm, r in d["arms"].items()]
    return "\n\n".join([head, table(["store", "views/s", f"views/s per core ({m['cores']})", "MB per view",
                                      "write GB/s", *names], rows, "l" + "r" * (len(names) + 4)),
                         machine_line(d)])


def edge_rows(d: dict) -> str:
    """edge.json: exported models on a small CPU: size, latency per photo (onnxruntime and eager), agreement."""
    rows = [[r["backbone"], f"{r['params_m']:.1f}", f"{r['fp32_mb']:.1f}", f"{r['int8_mb']:.1f}",
             *[f"{r[k]:.0f}" for k in ("eager_ms_1t", "ort_fp32_ms_1t", "ort_int8_ms_1t", "eager_ms_2t",
                                       "ort_fp32_ms_2t", "ort_int8_ms_2t")],
             f"{r['fp32_vs_eager_rel_rms']:.1e}", f"{r['int8_vs_fp32_rel_rms']:.1e}"] for r in d["rows"]]
    header = ["backbone", "params (M)", "fp32 MB", "int8 MB", "eager 1 thread (ms)", "ort fp32 1t", "ort int8 1t",
              "eager 2 threads", "ort fp32 2t", "ort int8 2t", "fp32 vs eager (rel. RMS)", "int8 vs fp32"]
    g = d["goals"]
    return "\n\n".join([f"{d['what']}; weights: {d['weights']}.", table(header, rows, "l" + "r" * 11),
                         f"Goals: an int8 ViT-S model of at most {g['int8_vit_s_mb']} MB, at most "
                         f"{g['ms_per_photo_one_core']} ms per photo on one core, int8 within "
                         f"{g['int8_vs_fp32']:.0%} of the fp32 graph.", machine_line(d)])


def edge_student_rows(d: dict) -> str:
    """edge_students.json: distilled students' pooled OOF score beside their teacher's, same folds and images."""
    rows = [[r["student"], r["finetune"], f"{r['features']:g}", r["epochs"], f"{r['oof_competition_r2']:.3f}",
             f"{r['teacher_oof_competition_r2']:.3f}", f"{r['seconds'] / 60:.1f}"] for r in d["rows"]]
    header = ["student", "fine-tuning", "feature loss weight", "epochs", "student OOF competition_r2",
              "teacher OOF competition_r2", "minutes"]
    t = d["teacher"]
    return "\n\n".join([f"{d['what']}; weights: {d['weights']}.", table(header, rows, "lllrrrr"),
                         f"Teacher: {t['backbone']} token cache, density head, {t['epochs']} epochs.", machine_line(d)])


def stage2_rows(d: dict) -> str:
    """stage2_*.json: the default 5-fold run against an earlier commit's loop, and against the matmul limit."""
    s = d["settings"]
    parts = [f"{s['images']} images, {s['folds']} folds x {s['epochs']} epochs, batch {s['batch_size']}, on "
             f"{s['device']}; {s['train']}. `before` is commit {s['baseline']}. Tokens: {s['signal']}."]
    for name, store in d["stores"].items():
        loads = "; ".join(f"{p}: {r['held']}, loaded in {r['seconds']:.1f} s ({r['gb_per_s']:.2f} GB/s)"
                          if r["held"] else f"{p}: does not fit ({'; '.join(r['refused'])})"
                          for p, r in store["token_load"].items())
        rows = []
        for head, h in store["heads"].items():
            lim = h["limits"]["matmul_gflops"]
            arms = [a for a in ("before", "fp32", "bf16", "stacked") if a in h]
            for arm in arms:
                runs, first = h[arm], h[arm][0]
                r2 = [r["oof_competition_r2"] for r in runs]
                speedup = h[arms[0]][0]["wall_s"] / first["wall_s"]
                around = first.get("matmul_gflops_around", {}).get("fp32")
                rows.append([head, arm, len(runs), f"{first['wall_s']:.0f}", f"{first['train_epochs_s']:.0f}",
                             f"{first['epoch_s']:.3f}", f"{first['achieved_gflops_per_s']:.0f}",
                             "-" if around is None else " / ".join(str(r) for r in around),
                             f"{first['share_of_fp32_matmul_limit']:.0%}" + (
                                 f" ({first['typical_share_of_fp32_matmul_limit']:.0%} median epoch)"
                                 if "typical_share_of_fp32_matmul_limit" in first else ""),
                             f"{first['share_of_bf16_matmul_limit']:.0%}",
                             f"{min(r2):.4f}-{max(r2):.4f}" if len(r2) > 1 else f"{r2[0]:.4f}",
                             f"**{speedup:.2f}x** vs {arms[0]}"])
            parts.append(f"Matmul limit at the {head} head's first layer, measured in the same run: "
                         f"{lim['fp32']:.0f} GFLOP/s fp32, {lim['bf16']:.0f} GFLOP/s bf16 before the runs; where "
                         "the table gives the fp32 rate just before / after a run, its shares are of their mean.")
        parts += [f"**{name}** store ({store['grid'][0]} x {store['grid'][1]} tokens x {store['channels']} channels, "
                  f"{store['gb']:.2f} GB). Token loading, apart from the runs: {loads}.",
                  table(["head", "arm", "seeds", "wall s (seed 0)", "training epochs s",
                         "s / epoch (stacked: of every fold)",
                         "achieved GFLOP/s", "fp32 limit before / after", "of fp32 limit", "of bf16 limit",
                         "OOF competition_r2 (seeds)", "speed-up (wall, seed 0)"], rows, "llrrrrrrrrrr")]
        if "tune" in store:
            parts += ["`biomass tune` on this store (density head, lr and weight decay searched, no pruning, no second "
                      "stage): `before` is the code of the baseline commit; then this code, trials alone and side by "
                      "side (`--parallel`):",
                      table(["--parallel", "trials", "epochs each", "wall s", "trials per hour"],
                            [[t["parallel"], t["trials"], t["epochs"], f"{t['wall_s']:.0f}",
                              f"**{t['trials_per_hour']:.0f}**"] for t in store["tune"]], "rrrrr")]
    parts.append(machine_line(d))
    return "\n\n".join(parts)


def tune_rows(d: dict) -> str:
    """tune.json: the density head tuned by `biomass tune` against its defaults, same folds, fresh seeds."""
    s = d["settings"]

    def score(r: dict) -> str:
        return f"{r['mean']:.3f} +- {r['std']:.3f}" if r["std"] is not None else f"{r['mean']:.3f}"

    rows = [["density head, defaults", score(d["default"])],
            [f"density head, tuned ({s['trials']} trials, top {s['top_k']} x {s['seeds']} seeds)", score(d["tuned"])]]
    stage = [[f"trial {r['trial']}", f"{r['search_r2']:.3f}", f"{r['mean']:.3f} +- {r['std']:.3f}",
              ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in
                        {**{k: r['train'][k] for k in ('lr', 'weight_decay', 'ema_decay')},
                         **r['train'].get('head_kwargs', {})}.items())]
             for r in d["study"]["rows"]]
    return "\n\n".join([f"{s['n_train']} images, {s['folds']} folds, {s['epochs']} epochs; mean +- std over fresh "
                        f"seeds.", table(["model", "competition_r2"], rows, "lr"),
                        f"Gain {d['gain']:+.3f}; tuning {d['tune_s']:.0f} s, wall {d['wall_s']:.0f} s.",
                        f"The second stage ({len(d['study']['rows'])} best trials of {d['study']['finished']}, re-run "
                        f"with seeds {d['study']['rows'][0]['seeds']}; winner trial {d['study']['winner']}):",
                        table(["trial", "search OOF", "second stage, mean +- std", "settings"], stage, "lrrl")])


def gpu_rows(d: dict) -> str:
    """gpu.json: extraction per precision on a GPU, agreement with fp32, the split path, LoRA memory, stage two."""
    s = d["settings"]
    head = (f"{s['backbone']} ({s['weights']} weights), input {size(s['size'])}, {s['views']} views, batch "
            f"{s['batch_size']}, {s['images']} {s['photos']} photos. {d.get('note', '')}")
    def rate(r: dict) -> str:  # results before the loop's own timing have the whole call's rate
        return f"{r.get('views_per_s', r.get('extract_views_per_s')):.1f}"

    ext = [[p, f"{r['bare_views_per_s']:.1f}", rate(r), f"{r['of_bare']:.2f}" if "of_bare" in r else "-",
            f"{r['vs_fp32']['rel_rms_per_layer'][0]:.5f}" if "vs_fp32" in r else "-",
            f"{r['vs_fp32']['cosine_per_layer'][0]:.6f}" if "vs_fp32" in r else "-",
            f"{r['vs_fp32']['max_abs_diff']:.4f}" if "vs_fp32" in r else "-"] for p, r in d["extract"].items()]
    parts = [head, table(["precision", "bare forward (views/s)", "extraction (views/s)", "of bare",
                          "rel. RMS vs fp32", "cosine vs fp32", "max abs diff"], ext, "lrrrrrr")]
    staged = {p: r for p, r in d["extract"].items() if "stages_s" in r}
    if staged:
        names = sorted({k for r in staged.values() for k in r["stages_s"]})
        parts.append(f"The loop's seconds by part (loop.Stages), and the write rate against this disk's "
                     f"{d['disk_write_bytes_per_s'] / 1e9:.2f} GB/s (plain writes + fsync, same run):")
        parts.append(table(["precision", "loop (s)", *names, "bytes per view", "write GB/s"],
                           [[p, f"{r['loop_s']:.1f}", *[f"{r['stages_s'].get(n, 0):.2f}" for n in names],
                             f"{r['bytes_per_view'] / 1e6:.2f} MB", f"{r['write_bytes_per_s'] / 1e9:.2f}"]
                            for p, r in staged.items()], "l" + "r" * (len(names) + 3)))
    if "split" in d:
        sp = d["split"]
        parts.append(f"Backbone split over `--devices {','.join(sp['devices'])}`: "
                     f"{sp.get('loop_s', sp.get('wall_s')):.1f} s, largest token difference from one device "
                     f"{sp['vs_one_device']['max_abs_diff']}.")
    if "lora" in d:
        lo = d["lora"]
        rows = [[k.replace("_", " "), f"{r['wall_s']:.1f}", f"{r['peak_gpu_gb']:.2f}"]
                for k, r in lo.items() if isinstance(r, dict)]
        parts += [f"`biomass lora --full --epochs {lo['epochs']}` on {lo['images']} images, batch {lo['batch_size']}:",
                  table(["LoRA", "wall (s)", "peak GPU memory (GB)"], rows, "lrr")]
    if "stage2" in d and "epoch_s" in d["stage2"]:  # the loop before the token bank; since: stage2_gpu.json
        st = d["stage2"]
        parts.append(f"Stage two on the GPU: `biomass train --head density --folds 5` on unreduced ViT-L-shaped tokens "
                     f"({st['images']} images, {st['epochs']} epochs): {st['epoch_s']:.3f} s per epoch, the default run "
                     f"at 357 images about {st['default_run_min_at_357']:.1f} min ({st['note']}).")
    parts.append(machine_line(d))
    return "\n\n".join(parts)


def machine_line(d: dict) -> str:
    m = d["machine"]
    return "Machine: " + ", ".join(f"{k} {v}" for k, v in m.items() if k != "load_average_1_5_15") + "."


RENDERERS: dict[str, tuple[Callable[[dict], str], str]] = {  # results file -> (renderer, script that writes it)
    "extract.json": (extract_rows, "bench_extract.py"),
    "extract_960x480.json": (extract_rows, "bench_extract.py --size 960 480 --images 12 --out ..."),
    "malloc.json": (malloc_rows, "bench_malloc.py"),
    "reduce.json": (reduce_rows, "bench_reduce.py"),
    "reduce_1core.json": (reduce_rows, "bench_reduce.py --cores 1 --images 32"),
    "reduce_357.json": (reduce_rows, "bench_reduce.py --images 357 --out ..."),
    "host.json": (host_rows, "bench_host.py"),
    "edge.json": (edge_rows, "bench_edge.py"),
    "edge_students.json": (edge_student_rows, "bench_edge.py --students"),
    "store.json": (store_rows, "bench_store.py"),
    "heads.json": (r2_rows, "bench_heads.py"),
    "heads_reduce.json": (r2_rows, "bench_heads.py --preset reduce"),
    "heads_reduce_large.json": (r2_rows, "bench_heads.py --preset reduce_large"),
    "heads_transfer.json": (transfer_rows, "bench_heads.py --preset transfer --threads 2"),
    "heads_transfer_80_e120.json": (transfer_rows, "bench_heads.py --preset transfer --sizes 80 --epochs 120 --out ..."),
    "heads_transfer_357_e120.json": (transfer_rows, "bench_heads.py --preset transfer --sizes 357 --epochs 120 --threads 1 --contenders density density-interval ridge --out ..."),
    "heads_techniques.json": (techniques_rows, "bench_heads.py --preset techniques"),
    "speed.json": (speed_rows, "bench_speed.py"),
    "lora.json": (lora_rows, "bench_lora.py"),
    "scale.json": (scale_rows, "bench_scale.py"),
    "tune.json": (tune_rows, "bench_tune.py"),
    "gpu.json": (gpu_rows, "bench_gpu.py"),
    "stage2_cpu.json": (stage2_rows, "bench_stage2.py"),
    "stage2_cpu_stacked.json": (stage2_rows,
                                "bench_stage2.py --arms bf16,stacked --seeds 0 --tune before,1,4 --out ..."),
    "stage2_gpu.json": (stage2_rows, "bench_gpu.py --stage2"),
}


def bench(results: Path, name: str) -> str:
    """The tables of one results file, or a note when it has not been recorded yet."""
    if name not in RENDERERS:
        raise GenerateError(f"no renderer for benchmarks/results/{name}; known: {', '.join(RENDERERS)}")
    render, script = RENDERERS[name]
    path = results / name
    if not path.is_file():
        return f"*`benchmarks/results/{name}` has not been recorded yet (`python benchmarks/{script}`).*"
    try:
        return f"*From `benchmarks/results/{name}`.*\n\n" + render(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise GenerateError(f"benchmarks/results/{name}: cannot render its tables ({type(e).__name__}: {e}); "
                            f"update {render.__name__} in docs/generate.py to the file's schema") from e


# ---------------------------------------------------------------------------------------------- markers
def expand(markdown: str, root: Path) -> str:
    """Replace every marker line of a page by its generated text; an unknown marker stops the build."""

    def one(m: re.Match) -> str:
        what = m.group("what").split()
        if what == ["cli"]:
            return cli_reference()
        if len(what) == 2 and what[0] == "bench":
            return bench(root / "benchmarks" / "results", what[1])
        if what[:1] == ["include"] and len(what) in (2, 3):
            path = root / what[1]
            if not path.is_file():
                raise GenerateError(f"include {what[1]}: no such file in the repository")
            text = path.read_text()
            return text if len(what) == 2 else f"```{what[2]}\n{text.rstrip()}\n```"
        raise GenerateError(f"unknown marker <!-- generate: {m.group('what')} -->")

    return MARKER.sub(one, markdown)
