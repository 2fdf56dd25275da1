"""The second synthetic style, "canopy": an independent generator to test whether what was tuned on the default
("blades") photos transfers.

The same files and label identities, made differently. Labels: plot totals are log-normal (a longer right tail
than the default's gamma), the clover / dead / green split is a logistic-normal draw with its own zero-inflation
(no clover in clover-free species, no dead matter in WA, some pure clover plots), and the picture shows the label
with ~15% multiplicative noise. Pictures are textured cover fields, not drawn blades: each class covers a share
1 - exp(-mass / scale) of the quadrat in clumps of multi-octave noise (bigger clumps in taller swards); a dense
green canopy gets darker as well as wider (self-shadowing); clover is round dark leaves with pale chevrons, in
patches, above the grass; dead matter is grey-brown streaky litter. Lighting is a directional sun gradient with
vignetting, exposure, colour temperature and sensor noise; nuisances are a photographer's shadow, a yellow tape
measure and date stamps.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from biomass_cache.synth.blades import (
    DRAW_WIDTH,
    MAX_G,
    QUADRAT_CM,
    SPECIES_ALPHA,
    date_stamp,
    label_table,
    plot_groups,
    smooth_noise,
)

# ---------------------------------------------------------------- labels
TOTAL_LOG = (3.63, 0.55)  # mean, sd of the log plot total (g) before the group effect
LOGIT_MEAN = {"clover": -1.3, "dead": -0.75, "green": 0.0}  # the composition's logits, green the reference
LOGIT_SD = {"clover": 1.2, "dead": 1.0}
CLOVER_SPECIES_SHIFT = 2.0  # "Clover" plots: clover logit raised by this much
GREEN_PER_LOG_TOTAL = 0.7  # lush plots are greener: green logit + this x log(total / 45)
P_NO_CLOVER, P_NO_DEAD, P_NO_GREEN = 0.05, 0.03, 0.5  # zero-inflation (no green: "Clover" plots only)
LABEL_NOISE = 0.15

# ---------------------------------------------------------------- painter
COVER_SCALE = {"clover": 9.0, "dead": 14.0, "green": 30.0}  # grams at which a class covers 1 - 1/e of the quadrat
SOIL = np.array([[120, 80, 62], [98, 90, 84], [140, 104, 78]], np.float32)  # red-brown, grey, sandy
LITTER = np.array([[150, 132, 110], [128, 108, 88], [170, 155, 130]], np.float32)  # grey-brown
GREEN_HSV = (0.20, 0.30, 0.45, 0.75)  # hue range, saturation range
CLOVER_RGB = np.array([40, 92, 72], np.float32)


def sample_labels_canopy(n: int, rng: np.random.Generator) -> tuple:
    """Sample n plots of the canopy style: (table, drawn masses), as `synth.blades.sample_labels` returns them."""
    g = plot_groups(n, rng)
    total = np.clip(g["level"].to_numpy() * np.exp(rng.normal(*TOTAL_LOG, n)), 1.0, MAX_G["Dry_Total_g"])
    species, state = g["Species"].to_numpy(), g["State"].to_numpy()
    logits = np.stack([rng.normal(LOGIT_MEAN["clover"], LOGIT_SD["clover"], n)
                       + CLOVER_SPECIES_SHIFT * (species == "Clover"),
                       rng.normal(LOGIT_MEAN["dead"], LOGIT_SD["dead"], n),
                       LOGIT_MEAN["green"] + GREEN_PER_LOG_TOTAL * np.log(total / 45.0)], axis=1)
    has_clover = np.array([SPECIES_ALPHA[s][0] > 0 for s in species]) & (rng.random(n) >= P_NO_CLOVER)
    has_dead = (state != "WA") & (rng.random(n) >= P_NO_DEAD)
    has_green = ~((species == "Clover") & has_clover & (rng.random(n) < P_NO_GREEN))
    weights = np.exp(logits) * np.stack([has_clover, has_dead, has_green], axis=1)
    comp = weights / weights.sum(axis=1, keepdims=True) * total[:, None]
    return label_table(g, comp, rng, LABEL_NOISE)


def _octaves(rng: np.random.Generator, size: tuple[int, int], cells: int, stretch: float = 1.0) -> np.ndarray:
    """Three octaves of smooth noise, the coarsest `cells` across; `stretch` > 1 makes streaks along x."""
    w, h = size
    out = np.zeros((h, w), np.float32)
    for k, amp in enumerate((0.55, 0.3, 0.15)):
        c = cells * 2**k
        out += amp * smooth_noise(rng, size, (max(2, round(c / stretch)), max(2, round(c * h / w))))
    return out


def _share(mass_g: float, scale_g: float) -> float:
    """The share of the quadrat a class of `mass_g` covers: 1 - exp(-mass / scale)."""
    return float(1.0 - np.exp(-max(mass_g, 0.0) / scale_g))


def _top(field: np.ndarray, share: float) -> np.ndarray:
    """The `share` of the pixels where `field` is highest."""
    if share <= 0:
        return np.zeros(field.shape, bool)
    return field >= np.quantile(field, 1.0 - share)


def _clover(rng: np.random.Generator, w: int, h: int, cm: float, mass_g: float) -> tuple[np.ndarray, np.ndarray]:
    """Round clover leaves in patches: (mask, per-pixel brightness with pale chevrons)."""
    share = _share(mass_g, COVER_SCALE["clover"])
    mask_img, light_img = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
    if share > 0:
        patches = _top(_octaves(rng, (w, h), 5), min(1.0, 1.6 * share))
        candidates = np.flatnonzero(patches)
        r = rng.uniform(0.5, 0.9) * cm
        n = int(rng.poisson(1.3 * share * w * h / (np.pi * r**2))) if len(candidates) else 0
        at = rng.choice(candidates, size=n) if n else np.zeros(0, int)
        mask, light = ImageDraw.Draw(mask_img), ImageDraw.Draw(light_img)
        for (y, x), rr, v in zip(np.stack(np.divmod(at, w), 1), r * rng.uniform(0.7, 1.3, n),
                                 rng.integers(150, 230, n)):
            mask.ellipse([x - rr, y - rr, x + rr, y + rr], fill=255)
            light.ellipse([x - rr, y - rr, x + rr, y + rr], fill=int(v) // 2)
            light.ellipse([x - 0.45 * rr, y - 0.2 * rr, x + 0.45 * rr, y + 0.35 * rr], fill=int(v))
    return np.asarray(mask_img) > 0, np.asarray(light_img, np.float32) / 255.0


def paint_canopy(rng: np.random.Generator, size: tuple[int, int], drawn: np.ndarray, height_cm: float,
                 sampling_date: str) -> Image.Image:
    """Paint one canopy-style quadrat photo of `size` (W, H) showing drawn (clover, dead, green) grams."""
    w_out, h_out = size
    w, h = DRAW_WIDTH, max(16, round(DRAW_WIDTH * h_out / w_out))
    cm = w / QUADRAT_CM
    clover_g, dead_g, green_g = (float(v) for v in drawn)

    img = SOIL[rng.integers(len(SOIL))] * (0.7 + 0.5 * _octaves(rng, (w, h), 30))[..., None]

    streaks = _octaves(rng, (w, h), 40, stretch=6.0)
    if rng.random() < 0.5:  # litter lies along x or along y
        streaks = np.asarray(Image.fromarray(streaks.T).resize((w, h), Image.Resampling.BILINEAR))
    litter = LITTER[rng.integers(len(LITTER))] * (0.75 + 0.5 * streaks)[..., None]
    img = np.where(_top(_octaves(rng, (w, h), 12), _share(dead_g, COVER_SCALE["dead"]))[..., None], litter, img)

    clump_cells = max(3, round(24 / (1 + height_cm / 8)))  # taller swards grow in bigger clumps
    canopy = 0.7 * _octaves(rng, (w, h), clump_cells) + 0.3 * rng.random((h, w), np.float32)
    hue = rng.uniform(*GREEN_HSV[:2])
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*GREEN_HSV[2:]), 1.0), np.float32) * 255
    depth = 1.0 - 0.45 * np.tanh(green_g / 70.0)  # a dense canopy shades itself
    texture = 0.45 + 0.55 * _octaves(rng, (w, h), 90, stretch=3.0)
    green = base * (depth * texture)[..., None] * 0.8
    img = np.where(_top(canopy, _share(green_g, COVER_SCALE["green"]))[..., None], green, img)

    leaves, light = _clover(rng, w, h, cm, clover_g)
    clover = CLOVER_RGB * (0.7 + 0.9 * light)[..., None]
    img = np.where(leaves[..., None], clover, img)

    img = _lighting(rng, img, w, h)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _tape(ImageDraw.Draw(out), rng, w, h, cm)
    if (w, h) != (w_out, h_out):
        out = out.resize((w_out, h_out), Image.Resampling.BILINEAR)
    if rng.random() < 0.2:
        date_stamp(out, rng, sampling_date)
    return out


def _lighting(rng: np.random.Generator, img: np.ndarray, w: int, h: int) -> np.ndarray:
    """Sun from one side (a linear gradient), vignetting, exposure, colour temperature, a photographer's shadow on
    some photos, sensor noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xx / w - 0.5) * 2, (yy / h - 0.5) * 2
    angle = rng.uniform(0, 2 * np.pi)
    gain = 1 + rng.uniform(0.1, 0.35) * (u * np.cos(angle) + v * np.sin(angle)) / 1.4
    gain *= 1 - rng.uniform(0.05, 0.25) * (u**2 + v**2) / 2
    if rng.random() < 0.3:  # the photographer's shadow reaches in from one edge
        cx, cy = rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 1.1), rng.uniform(-0.6, 0.6)
        inside = ((u - cx) / rng.uniform(0.4, 0.8)) ** 2 + ((v - cy) / rng.uniform(0.5, 1.0)) ** 2 < 1
        gain *= np.where(inside, rng.uniform(0.45, 0.7), 1.0)
    temperature = rng.uniform(-0.08, 0.08)
    tint = np.array([1 + temperature, 1.0, 1 - temperature], np.float32) * rng.uniform(0.7, 1.25)
    noise = rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)
    return img * gain[..., None] * tint + noise


def _tape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, cm: float) -> None:
    """A yellow tape measure with black ticks across some photos."""
    if rng.random() >= 0.3:
        return
    y0, y1 = rng.uniform(0.1, 0.9, 2) * h
    width = rng.uniform(1.5, 2.5) * cm
    draw.line([(0, y0), (w, y1)], fill=(230, int(rng.integers(190, 215)), 40), width=round(width))
    for x in np.arange(0, w, cm):
        y = y0 + (y1 - y0) * x / w
        draw.line([(x, y - width / 2), (x, y - width / 2 + width * 0.4)], fill=(20, 20, 20), width=1)
