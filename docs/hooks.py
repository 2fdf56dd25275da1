"""mkdocs hook: expand the `<!-- generate: ... -->` markers of every page (docs/generate.py) at build time."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's biomass_cache, for the CLI reference
_spec = importlib.util.spec_from_file_location("biomass_docs_generate", Path(__file__).with_name("generate.py"))
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def on_page_markdown(markdown, page, config, files):
    try:
        return generate.expand(markdown, ROOT)
    except generate.GenerateError as e:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{page.file.src_path}: {e}") from e
