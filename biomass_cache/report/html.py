"""Rendering a report: the jinja2 templates of report/templates, figures as inline PNG data URIs, one file.

A report is one self-contained HTML file: no script, no network, every image inline, so it opens the same from a
disk, a mail or a Kaggle notebook's output viewer.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from biomass_cache.common.io import write_bytes  # noqa: E402

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("biomass_cache.report", "templates"),
                          autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True)


def figure_uri(fig: plt.Figure) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def render(template: str, path: Path, /, **context: Any) -> Path:
    """Render `template` with `context` into `path`, written atomically."""
    html = _ENV.get_template(template).render(**context)
    write_bytes(Path(path), html.encode())
    return Path(path)
