"""The "blades" synthetic generator (the default): labels drawn like the real 357 training images and pictures that
carry them.

Labels follow a joint distribution close to the real table (per-State composition, zero-inflated clover and dead,
(date, State) groups of unequal size, NDVI and height correlated with the biomass). Pictures carry the labels the way
top-down 70 x 30 cm quadrat photos do: the area covered by green blades, straw-coloured dead litter and trefoil clover
leaves grows with each class's drawn mass (saturating as the cover closes, leaving less brown soil and grey stones
visible), blades get longer with height, and the drawn mass differs from the label by ~10% multiplicative noise.
Nuisances: illumination and white balance, soft shadows, slight blur, date stamps, red marker dots and a partly
visible quadrat frame. The primitives here (groups, label table, noise, date stamp) are shared with `synth/canopy.py`.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from biomass_cache.common.targets import COMPONENTS, TARGETS

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
