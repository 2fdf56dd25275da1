"""A synthetic Kaggle-format pasture dataset: the embedded default data for the demo and every test.

Real competition images cannot be downloaded, so this writes a complete data folder in the competition's exact
formats (train.csv, test.csv, sample_submission.csv, train/*.jpg, test/*.jpg) plus test_labels.csv, the hidden
answers for local scoring. Labels follow a joint distribution close to the real 357 training images (per-State
composition, zero-inflated clover and dead, (date, State) groups of unequal size, NDVI and height correlated with
the biomass). Pictures carry the labels the way top-down 70 x 30 cm quadrat photos do: the area covered by green
blades, straw-coloured dead litter and trefoil clover leaves grows with each class's drawn mass (saturating as the
cover closes, leaving less brown soil and grey stones visible), blades get longer with height, and the drawn mass
differs from the label by ~10% multiplicative noise. Nuisances: illumination and white balance, soft shadows,
slight blur, date stamps, red marker dots and a partly visible quadrat frame.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import typer
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from biomass_cache.targets import COMPONENTS, TARGETS

# ---------------------------------------------------------------- label distribution (fitted to the real table)
STATES = ("Tas", "Vic", "NSW", "WA")
STATE_P = (0.39, 0.31, 0.21, 0.09)
STATE_SPECIES = {  # species mix of a State's plots
    "Tas": {"Ryegrass_Clover": 0.65, "Ryegrass": 0.15, "Clover": 0.12, "Fescue": 0.08},
    "Vic": {"Ryegrass_Clover": 0.45, "Phalaris_Clover": 0.35, "Ryegrass": 0.20},
    "NSW": {"Lucerne": 0.40, "Fescue": 0.35, "Ryegrass": 0.25},
    "WA": {"Clover": 0.60, "Ryegrass_Clover": 0.40},
}
SPECIES_ALPHA = {  # Dirichlet concentration of the (clover, dead, green) composition; clover-free species have 0
    "Ryegrass_Clover": (0.9, 1.25, 2.4),
    "Phalaris_Clover": (0.7, 1.45, 2.4),
    "Clover": (2.2, 1.0, 1.1),
    "Ryegrass": (0.0, 1.25, 2.4),
    "Fescue": (0.0, 1.6, 2.2),
    "Lucerne": (0.0, 1.25, 2.4),
}
TOTAL_GAMMA = (3.0, 14.9)  # shape, scale of the plot total (g) before the group effect
GROUP_SD = 0.25  # log-sd of a (date, State) group's biomass level
GREEN_TOTAL_POWER = 0.6  # lush plots are greener: green concentration grows as (total / 45) ** power
P_NO_CLOVER, P_NO_DEAD, P_NO_GREEN = 0.04, 0.03, 0.55  # zero-inflation (no green: pure "Clover" plots only)
MAX_G = {"Dry_Clover_g": 72.0, "Dry_Dead_g": 84.0, "Dry_Green_g": 158.0, "GDM_g": 158.0, "Dry_Total_g": 186.0}
IMAGES_PER_GROUP = 12
LABEL_NOISE = 0.10  # log-sd between the mass drawn in the picture and the label
CSV_TARGETS = tuple(sorted(TARGETS))  # Kaggle's files list an image's targets alphabetically
STYLES = ("blades", "canopy")  # generators (`generate(style=)`); "canopy" lives in synth_canopy.py

# ---------------------------------------------------------------- painter constants (lengths in cm on the quadrat)
QUADRAT_CM = 70.0
DRAW_WIDTH = 500  # paint this wide, then resize: the scene does not depend on the output size; fast; a bit soft
COVER_PER_G = {"clover": 1 / 14, "dead": 1 / 18, "green": 1 / 22}  # blade area per gram, in quadrat areas
MAX_COVER = 4.0  # beyond ~98% cover extra primitives change nothing visible
LAYERS = 6  # green and clover are drawn in this many interleaved layers
SOIL_COLOURS = np.array([[105, 78, 52], [125, 92, 60], [92, 72, 58], [140, 110, 80]], np.float32)
STRAW = np.array([[205, 185, 125], [180, 150, 95], [150, 115, 70], [215, 200, 150]], np.float32)
GRASS = np.array([[85, 140, 45], [70, 125, 40], [110, 160, 60], [60, 105, 35]], np.float32)
CLOVER = np.array([[60, 120, 85], [75, 135, 95], [50, 105, 75]], np.float32)  # a bit bluish


# ================================================================ labels


def _split_counts(n: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder split of n into integer parts proportional to weights."""
    raw = n * np.asarray(weights, float) / np.sum(weights)
    counts = np.floor(raw).astype(int)
    counts[np.argsort(counts - raw, kind="stable")[: n - counts.sum()]] += 1
    return counts


def plot_groups(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """One row per image: its (date, State) group, the group's biomass level and the plot's species.

    About n / 12 groups (at least 4), split among the States by image share, sizes very unequal; about 28 distinct
    dates for 30 groups, all in 2015.
    """
    state_n = _split_counts(n, np.array(STATE_P))
    n_groups = min(n, max(4, round(n / IMAGES_PER_GROUP)))
    group_n = np.minimum(np.maximum(_split_counts(n_groups, state_n), state_n > 0), state_n)
    n_dates = min(365, max(1, round(group_n.sum() * 28 / 30)))
    pool = [date(2015, 1, 1) + timedelta(days=int(k)) for k in np.sort(rng.choice(365, n_dates, replace=False))]
    group_day = iter(np.concatenate([rng.permutation(n_dates), rng.integers(n_dates, size=group_n.sum() - n_dates)]))
    rows, species_all = [], []
    for state, n_s, g_s in zip(STATES, state_n, group_n):
        if n_s == 0:
            continue
        sizes = 1 + rng.multinomial(n_s - g_s, rng.dirichlet(np.full(g_s, 0.7)))
        species = rng.choice(list(STATE_SPECIES[state]), size=n_s, p=list(STATE_SPECIES[state].values()))
        for size in sizes:
            day = pool[next(group_day)]
            level = np.exp(rng.normal(-GROUP_SD**2 / 2, GROUP_SD))
            rows += [(day, state, level)] * size
        species_all.append(species)
    table = pd.DataFrame(rows, columns=["day", "State", "level"]).assign(Species=np.concatenate(species_all))
    return table.iloc[rng.permutation(n)].reset_index(drop=True)


def sample_labels(n: int, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Sample n plots: a table (metadata + the five targets, 4-decimal, identities exact) and the drawn masses.

    The drawn masses (n, 3) clover, dead, green are what the painter puts in the picture: the label times ~10%
    multiplicative noise, as real labels (dried, weighed clippings) differ from what a photo shows.
    """
    g = plot_groups(n, rng)
    day = g["day"].to_numpy()
    total = np.clip(g["level"].to_numpy() * rng.gamma(*TOTAL_GAMMA, n), 1.0, MAX_G["Dry_Total_g"])

    alpha = np.array([SPECIES_ALPHA[s] for s in g["Species"]])
    summer = np.array([np.cos(2 * np.pi * (d.timetuple().tm_yday - 45) / 365) for d in day])
    alpha[:, 1] *= (1 + 0.4 * summer) * (g["State"] != "WA").to_numpy()  # WA plots carry no dead matter
    alpha[:, 2] *= (total / 45.0) ** GREEN_TOTAL_POWER
    alpha[:, 0] *= rng.random(n) >= P_NO_CLOVER
    alpha[:, 1] *= rng.random(n) >= P_NO_DEAD
    no_green = (g["Species"] == "Clover").to_numpy() & (alpha[:, 0] > 0) & (rng.random(n) < P_NO_GREEN)
    alpha[no_green, 2] = 0.0
    parts = rng.gamma(np.where(alpha > 0, alpha, 1.0)) * (alpha > 0)
    comp = parts / parts.sum(axis=1, keepdims=True) * total[:, None]
    return label_table(g, comp, rng, LABEL_NOISE)


def label_table(g: pd.DataFrame, comp: np.ndarray, rng: np.random.Generator,
                label_noise: float) -> tuple[pd.DataFrame, np.ndarray]:
    """Plots' metadata table `g` (from `plot_groups`) and (n, 3) clover, dead, green grams -> (table, drawn masses).

    The grams are truncated to 4 decimals within the real maxima with GDM at least 1 g, so the identities hold
    exactly; NDVI and height are drawn from the result; drawn = labels x exp(N(0, label_noise)).
    """
    n, day = len(g), g["day"].to_numpy()
    # truncate (not round) to 4 decimals so that sums never exceed the maxima
    clover, dead, green = (np.round(np.floor(np.minimum(comp[:, k], MAX_G[name]) * 1e4) / 1e4, 4)
                           for k, name in enumerate(COMPONENTS))
    green = np.round(np.clip(green, 1.0 - clover, MAX_G["GDM_g"] - clover), 4)  # GDM within [1, 158] g
    gdm = np.round(clover + green, 4)
    labels = {"Dry_Clover_g": clover, "Dry_Dead_g": dead, "Dry_Green_g": green, "GDM_g": gdm,
              "Dry_Total_g": np.round(gdm + dead, 4)}

    total = labels["Dry_Total_g"]
    green_frac = green / total
    ndvi = 0.37 + 0.42 * green_frac + 0.12 * np.tanh(total / 60) + rng.normal(0, 0.07, n)
    z = (np.log(total) - 3.6) / 0.65
    height = 4.0 * np.exp(1.13 * (0.65 * z + np.sqrt(1 - 0.65**2) * rng.normal(size=n)))

    table = pd.DataFrame({
        "Sampling_Date": [f"{d.year}/{d.month}/{d.day}" for d in day],
        "State": g["State"],
        "Species": g["Species"],
        "Pre_GSHH_NDVI": np.round(np.clip(ndvi, 0.16, 0.91), 2),
        "Height_Ave_cm": np.round(np.clip(height, 1.0, 70.0), 2),
        **{t: labels[t] for t in TARGETS},
    })
    drawn = np.stack([clover, dead, green], axis=1) * np.exp(rng.normal(0, label_noise, (n, 3)))
    return table, drawn


def _image_ids(n: int, rng: np.random.Generator) -> list[str]:
    """n unique ids `ID` + 7 to 10 digits."""
    ids: list[str] = []  # a list keeps the draw order (a set's order would vary between runs)
    seen: set[str] = set()
    while len(ids) < n:
        digits = int(rng.integers(7, 11))
        new = f"ID{rng.integers(10 ** (digits - 1), 10**digits)}"
        if new not in seen:
            seen.add(new)
            ids.append(new)
    return ids


# ================================================================ painter


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Smooth random field in [0, 1] of shape (H, W): a coarse grid of random values, bilinearly upsampled."""
    coarse = Image.fromarray((rng.random((cells[1], cells[0])) * 255).astype(np.uint8))
    return np.asarray(coarse.resize(size, Image.Resampling.BILINEAR), np.float32) / 255.0


def _soil(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Brown soil with blotches and grain."""
    w, h = size
    base = SOIL_COLOURS[rng.integers(len(SOIL_COLOURS))] * rng.uniform(0.85, 1.15)
    shade = (0.75 + 0.5 * smooth_noise(rng, size, (12, 6))) * (0.86 + 0.28 * rng.random((h, w), np.float32))
    return Image.fromarray(np.clip(shade[..., None] * base, 0, 255).astype(np.uint8))


def _count(mass_g: float, cover_per_g: float, canvas_px: float, primitive_px: float, rng: np.random.Generator) -> int:
    """How many primitives cover `mass_g * cover_per_g` quadrat areas (capped where cover has closed)."""
    return int(rng.poisson(min(mass_g * cover_per_g, MAX_COVER) * canvas_px / primitive_px))


def _jitter_colours(rng: np.random.Generator, base: np.ndarray, n: int, spread: float) -> list[tuple[int, ...]]:
    """n colours around one of the base colours: per-primitive hue and brightness variation."""
    pick = base[rng.integers(len(base), size=n)]
    c = pick * rng.uniform(1 - spread, 1 + spread, (n, 1)) + rng.normal(0, 8, (n, 3))
    return [tuple(v) for v in np.clip(c, 0, 255).astype(int).tolist()]


def _blades(rng: np.random.Generator, starts: np.ndarray, length: np.ndarray, width: int,
            colours: list[tuple[int, ...]], bend: float) -> list[tuple]:
    """Slightly curved blades (3-point polylines) from starts (n, 2) in random directions: (xy, colour, width)."""
    n = len(starts)
    angle = rng.uniform(0, 2 * np.pi, n)
    turn = angle + rng.normal(0, bend, n)
    mid = starts + 0.5 * length[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    end = mid + 0.5 * length[:, None] * np.stack([np.cos(turn), np.sin(turn)], 1)
    flat = np.concatenate([starts, mid, end], axis=1).tolist()  # x0, y0, x1, y1, x2, y2 per blade
    return [(xy, c, width) for xy, c in zip(flat, colours)]


def _trefoils(rng: np.random.Generator, n: int, leaf_r: float, w: int, h: int,
              colours: list[tuple[int, ...]]) -> list[tuple]:
    """n clover leaves of three round leaflets that just touch: (three leaflet boxes, colour, None) per leaf."""
    centres = rng.uniform(0, 1, (n, 2)) * [w, h]
    theta = rng.uniform(0, 2 * np.pi, (n, 1)) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    radius = leaf_r * rng.uniform(0.7, 1.3, (n, 1))
    lx, ly = centres[:, :1] + 1.15 * radius * np.cos(theta), centres[:, 1:] + 1.15 * radius * np.sin(theta)
    boxes = np.stack([lx - radius, ly - radius, lx + radius, ly + radius], axis=2).tolist()  # (n, 3, 4)
    return [(leaf, c, None) for leaf, c in zip(boxes, colours)]


def _draw(draw: ImageDraw.ImageDraw, items: list[tuple]) -> None:
    """Draw blades (with a width) as polylines and clover leaves (no width) as filled ellipses."""
    for xy, colour, width in items:
        if width is None:
            for box in xy:
                draw.ellipse(box, fill=colour)
        else:
            draw.line(xy, fill=colour, width=width)


def paint(rng: np.random.Generator, size: tuple[int, int], drawn: np.ndarray, height_cm: float,
          sampling_date: str) -> Image.Image:
    """Paint one top-down quadrat photo of `size` (W, H) showing drawn (clover, dead, green) grams.

    The scene is painted DRAW_WIDTH wide and resized, so one rng gives the same picture at any output size.
    """
    w_out, h_out = size
    w, h = DRAW_WIDTH, max(16, round(DRAW_WIDTH * h_out / w_out))
    cm = w / QUADRAT_CM  # pixels per cm on the painting canvas
    area = float(w * h)
    img = _soil(rng, (w, h))
    draw = ImageDraw.Draw(img)
    clover_g, dead_g, green_g = (float(v) for v in drawn)

    # stones: visible only where the vegetation leaves gaps
    n_stones = rng.poisson(rng.beta(0.6, 2.0) * 40)
    for x, y, r, g in zip(rng.uniform(0, w, n_stones), rng.uniform(0, h, n_stones),
                          rng.uniform(0.3, 1.6, n_stones) * cm, rng.integers(110, 200, n_stones)):
        e = rng.uniform(0.6, 1.0)
        draw.ellipse([x - r, y - r * e, x + r, y + r * e], fill=(int(g), int(g), int(g * 0.95)),
                     outline=(int(g * 0.7),) * 3)

    # dead litter lies flat under the canopy: straw to brown, thin, any direction
    dead_len, dead_w = rng.uniform(3, 9) * cm, max(1, round(0.22 * cm))
    n = _count(dead_g, COVER_PER_G["dead"], area, dead_len * dead_w, rng)
    _draw(draw, _blades(rng, rng.uniform(0, 1, (n, 2)) * [w, h], dead_len * rng.uniform(0.5, 1.5, n), dead_w,
                        _jitter_colours(rng, STRAW, n, 0.15), bend=0.25))

    # green blades radiate from tussocks; taller swards have longer, broader blades
    blade_len = np.clip(2.0 + 0.7 * height_cm, 2.0, 30.0) * cm
    blade_w = max(1, round(np.clip(0.25 + 0.01 * height_cm, 0.25, 0.6) * cm))
    n = _count(green_g, COVER_PER_G["green"], area, blade_len * blade_w, rng)
    tussocks = rng.uniform(0, 1, (max(1, n // 12), 2)) * [w, h]
    starts = tussocks[rng.integers(len(tussocks), size=n)] + rng.normal(0, 0.6 * cm, (n, 2))
    green = _blades(rng, starts, blade_len * rng.uniform(0.5, 1.3, n), blade_w, _jitter_colours(rng, GRASS, n, 0.2),
                    bend=0.5)
    leaf_r = rng.uniform(0.4, 0.7) * cm  # leaflet radius
    n = _count(clover_g, COVER_PER_G["clover"], area, 3 * np.pi * leaf_r**2, rng)
    clover = _trefoils(rng, n, leaf_r, w, h, _jitter_colours(rng, CLOVER, n, 0.12))
    for k in range(LAYERS):  # clover grows among the grass: interleave so neither hides the other entirely
        _draw(draw, green[k::LAYERS])
        _draw(draw, clover[k::LAYERS])

    _frame_and_markers(draw, rng, w, h, cm)
    img = _lighting(img, rng)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    if (w, h) != (w_out, h_out):
        img = img.resize((w_out, h_out), Image.Resampling.BILINEAR)
    if rng.random() < 0.2:
        date_stamp(img, rng, sampling_date)
    return img


def _frame_and_markers(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, cm: float) -> None:
    """A partly visible white or metal quadrat frame along some edges, and red paint marker dots."""
    if rng.random() < 0.5:
        colour = tuple(int(v) for v in rng.choice([[235, 235, 230], [185, 188, 192]]) * rng.uniform(0.9, 1.05))
        for edge in rng.choice(4, size=rng.integers(1, 3), replace=False):
            t0, t1 = rng.uniform(-1.5, 1.5, 2) * cm  # inset at both ends: the frame is not perfectly aligned
            bar = rng.uniform(1.2, 2.5) * cm
            a, b = rng.uniform(0, 0.4), rng.uniform(0.6, 1.0)  # the visible part of the edge
            if edge in (0, 1):  # top / bottom
                y0 = t0 if edge == 0 else h - t0
                y1 = t1 if edge == 0 else h - t1
                s = -bar if edge == 0 else bar
                poly = [(a * w, y0), (b * w, y1), (b * w, y1 + s), (a * w, y0 + s)]
            else:  # left / right
                x0 = t0 if edge == 2 else w - t0
                x1 = t1 if edge == 2 else w - t1
                s = -bar if edge == 2 else bar
                poly = [(x0, a * h), (x1, b * h), (x1 + s, b * h), (x0 + s, a * h)]
            draw.polygon([(float(x), float(y)) for x, y in poly], fill=colour)
    if rng.random() < 0.2:
        for _ in range(rng.integers(1, 4)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.4, 1.0) * cm
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(int(rng.integers(190, 235)), 30, 35))


def _lighting(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Global exposure, white balance and contrast (gamma) as one lookup table; soft shadows on some photos."""
    levels = np.arange(256) / 255.0
    gains = rng.uniform(0.75, 1.2) * rng.normal(1.0, 0.05, 3)
    curves = np.clip(levels[None] ** rng.uniform(0.85, 1.2) * gains[:, None], 0, 1) * 255 + 0.5
    img = img.point(curves.astype(np.uint8).ravel().tolist())
    if rng.random() < 0.4:
        field = smooth_noise(rng, img.size, (int(rng.integers(2, 6)), int(rng.integers(2, 4))))
        mask = np.clip((field - rng.uniform(0.4, 0.7)) / 0.15, 0, 1) * 255
        keep = 1 - rng.uniform(0.25, 0.55)
        dark = img.point(lambda v: v * keep)
        img = Image.composite(dark, img, Image.fromarray(mask.astype(np.uint8)))
    return img


def date_stamp(img: Image.Image, rng: np.random.Generator, sampling_date: str) -> None:
    """A camera's yellow/orange date overlay in a corner, drawn at output resolution."""
    y, m, d = sampling_date.split("/")
    text = f"{int(d):02d} {int(m):02d} '{y[2:]}" if rng.random() < 0.5 else f"{y}/{int(m):02d}/{int(d):02d}"
    font = ImageFont.load_default(size=max(8, img.height // 22))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = img.height // 30
    x = pad if rng.random() < 0.3 else img.width - (right - left) - pad
    y_px = pad if rng.random() < 0.3 else img.height - (bottom - top) - pad
    draw.text((x, y_px), text, font=font, fill=(255, int(rng.integers(150, 215)), int(rng.integers(0, 60))))


# ================================================================ files


def _long_rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """Kaggle long format: one row per (image, target), sorted by image id, targets alphabetical."""
    table = table.sort_values("image_id", kind="stable")
    long = table.loc[table.index.repeat(len(CSV_TARGETS))].reset_index(drop=True)
    long["target_name"] = np.tile(CSV_TARGETS, len(table))
    long["sample_id"] = long["image_id"] + "__" + long["target_name"]
    long["image_path"] = split + "/" + long["image_id"] + ".jpg"
    long["target"] = table[list(CSV_TARGETS)].to_numpy().ravel()  # row-major: image by image, targets in order
    return long


def _write_csvs(folder: Path, train: pd.DataFrame, test: pd.DataFrame) -> None:
    """train.csv, test.csv, sample_submission.csv and test_labels.csv in the competition's columns and orders."""
    meta = ["Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm"]
    tr, te = _long_rows(train, "train"), _long_rows(test, "test")
    tr[["sample_id", "image_path", *meta, "target_name", "target"]].to_csv(folder / "train.csv", index=False)
    te[["sample_id", "image_path", "target_name"]].to_csv(folder / "test.csv", index=False)
    te.assign(target=0.0)[["sample_id", "target"]].to_csv(folder / "sample_submission.csv", index=False)
    te[["sample_id", "target"]].to_csv(folder / "test_labels.csv", index=False)


# ================================================================ generate + command


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent stream per purpose (ids, labels of a split, one image), so every image is reproducible alone."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; use overwrite=True (--overwrite) to replace it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder to out_dir; an existing non-empty out_dir is swapped out, then deleted."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)  # rename(2) replaces a missing or empty directory


def colour_features(path: Path) -> np.ndarray:
    """Mean/std of RGB and HSV plus the share of green, brown, dark-soil and straw-like pixels of a photo.

    The simple baseline the pictures are checked against (tests) and that heads must beat (bench_heads.py).
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
        rgb = np.asarray(im, np.float32).reshape(-1, 3) / 255
        hsv = np.asarray(im.convert("HSV"), np.float32).reshape(-1, 3) / 255
    r, g, b = rgb.T
    green, brown = (g > r) & (g > b), (r > g) & (g > b)
    soil = brown & (hsv[:, 2] < 0.5)
    return np.concatenate([rgb.mean(0), rgb.std(0), hsv.mean(0), hsv.std(0),
                           [green.mean(), brown.mean(), soil.mean(), (brown & ~soil).mean()]])


def _style(name: str) -> tuple[Callable, Callable, tuple[int, ...]]:
    """(label sampler, painter, random-stream key prefix) of a style; the prefix keeps styles' draws independent."""
    from biomass_cache.synth_canopy import paint_canopy, sample_labels_canopy  # it builds on this module

    styles = {"blades": (sample_labels, paint, ()), "canopy": (sample_labels_canopy, paint_canopy, (1,))}
    if name not in styles:
        raise ValueError(f"unknown style {name!r}; choose one of {', '.join(STYLES)}")
    return styles[name]


def generate(out_dir: Path, n_train: int = 120, n_test: int = 24, seed: int = 0, size: tuple[int, int] = (1000, 500),
             progress: bool = True, overwrite: bool = False, style: str = "blades") -> dict:
    """Write a complete synthetic Kaggle-format data folder at out_dir, atomically; return a summary.

    `style` picks the generator (STYLES): "blades" (this module) or "canopy" (`synth_canopy`, an independent one
    for transfer tests). Deterministic: the same arguments give byte-identical CSVs and images. The folder is built in a hidden
    sibling and renamed into place, so out_dir is either complete or untouched. The summary's images_per_s
    (painting + JPEG, one process) is wall-clock, so it is lower on a shared CPU.
    """
    out_dir = Path(out_dir)
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be at least 1, got {n_train} and {n_test}")
    width, height = size
    if min(width, height) < 16:
        raise ValueError(f"image size must be at least 16 x 16 pixels, got {width} x {height}")
    sampler, painter, key = _style(style)
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    start = time.perf_counter()
    try:
        ids = _image_ids(n_train + n_test, _rng(seed, *key, 0))
        tables = {}
        with tqdm(total=n_train + n_test, desc="synth", unit="img", disable=not progress) as bar:
            for code, (split, split_ids) in enumerate([("train", ids[:n_train]), ("test", ids[n_train:])]):
                table, drawn = sampler(len(split_ids), _rng(seed, *key, 1, code))
                tables[split] = table.assign(image_id=split_ids)
                (tmp / split).mkdir()
                for i, image_id in enumerate(split_ids):
                    img = painter(_rng(seed, *key, 2, code, i), (width, height), drawn[i],
                                float(table.at[i, "Height_Ave_cm"]), table.at[i, "Sampling_Date"])
                    img.save(tmp / split / f"{image_id}.jpg", format="JPEG", quality=90)
                    bar.update()
        _write_csvs(tmp, tables["train"], tables["test"])
        tmp.chmod(0o755)  # mkdtemp makes it private
        _check_out_dir(out_dir, overwrite)  # it may have appeared meanwhile
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    return {
        "out_dir": str(out_dir), "n_train": n_train, "n_test": n_test, "seed": seed, "style": style,
        "size": [width, height],
        "seconds": round(seconds, 3), "images_per_s": round((n_train + n_test) / seconds, 1),
        "files": {name: str(out_dir / name) for name in
                  ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv", "train", "test")},
    }


def parse_photo_size(text: str) -> tuple[int, int]:
    """'1000x500' -> (1000, 500); anything else is a clear error."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) < 16:
        raise ValueError(f"--size must be WIDTHxHEIGHT with whole numbers of at least 16 pixels, e.g. 1000x500; "
                         f"got {text!r}")
    return int(parts[0]), int(parts[1])


def synth_command(
    out_dir: Path = typer.Argument(..., help="Folder to create (train.csv, test.csv, train/, test/, ...)."),
    n_train: int = typer.Option(120, "--n-train", min=1, help="Number of training images."),
    n_test: int = typer.Option(24, "--n-test", min=1, help="Number of test images."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    size: str = typer.Option("1000x500", "--size", help="Image size WxH in pixels (real photos are 2:1)."),
    style: str = typer.Option("blades", "--style", help="Generator: blades (the default data) or canopy (an "
                              "independent one, to test whether settings transfer)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace out_dir if it exists and is not empty."),
) -> None:
    """Write a synthetic Kaggle-format pasture dataset (images + CSVs + hidden test labels)."""
    try:
        wh = parse_photo_size(size)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--size'") from e
    if style not in STYLES:
        raise typer.BadParameter(f"unknown style {style!r}; choose one of {', '.join(STYLES)}", param_hint="'--style'")
    try:
        summary = generate(out_dir, n_train=n_train, n_test=n_test, seed=seed, size=wh, overwrite=overwrite,
                           style=style)
    except FileExistsError as e:
        raise typer.BadParameter(str(e), param_hint="'OUT_DIR'") from e
    typer.echo(f"synth: {n_train} train + {n_test} test images, {wh[0]}x{wh[1]}, {style} style, seed {seed}, "
               f"{summary['images_per_s']} images/s -> {out_dir}")
