"""The `biomass` command line: one typer app, one sub-command per pipeline step.

The top-level scripts (extract_features.py, train_heads.py, submit.py) run the same command functions.
"""

from __future__ import annotations

import importlib
from difflib import get_close_matches
from typing import Callable

import click
import typer

from biomass_cache.cli.errors import DEBUG_KEY, BiomassGroup, UsageError, run_app, script_app
from biomass_cache.common.runtime import keep_freed_memory

# name -> (module of biomass_cache.cli, function, one-line help). A command's module (and torch, timm, sklearn behind
# it) is imported only when that command runs or shows its help, so `biomass --help` answers at once.
COMMANDS = {
    "demo": ("demo", "demo_command", "Run the whole pipeline end to end on synthetic data (random backbone), on the CPU."),
    "synth": ("synth", "synth_command", "Write a synthetic Kaggle-format pasture dataset (the embedded demo data)."),
    "extract": ("extract", "extract_command",
                "Stage one: run the frozen backbone over every view, write tokens to a Zarr store."),
    "verify": ("verify", "verify_command", "Read back a token store; report corrupt chunks and samples not extracted."),
    "reduce": ("reduce", "reduce_command", "Derive a smaller token store: per-layer PCA channels and a pooled patch grid."),
    "train": ("train", "train_command", "Stage two: train readout heads on cached tokens with grouped k-fold CV."),
    "tune": ("tune", "tune_command", "Search training settings with Optuna on a token cache; write the winner as best.toml."),
    "lora": ("lora", "lora_command", "Train LoRA adapters + a head with the backbone run live (train_heads.py --lora)."),
    "submit": ("submit", "submit_command",
               "Ensemble trained heads on the test images and write a validated submission.csv."),
    "pseudo": ("pseudo", "pseudo_command",
               "Pseudo-label the test images with an ensemble; train heads on train + test tokens."),
    "distill": ("distill", "distill_command",
                "Distil a teacher (runs or an ensemble) into a small student backbone and a head."),
    "score": ("score", "score_command", "Score a submission against labels (competition_r2 and log_r2)."),
    "report": ("report", "report_command",
               "Write the HTML report of a run, a submission or a study: scores with intervals, figures."),
    "compare": ("report", "compare_command",
                "Paired grouped-bootstrap differences of runs' out-of-fold scores on the same folds."),
    "predict": ("predict", "predict_command", "Predict biomass for a plain folder of quadrat photos (no CSV needed)."),
    "export": ("export", "export_command", "Export runs as one ONNX graph (backbone, reduction, heads, TTA) + model.json."),
    "bundle": ("bundle", "bundle_command", "Pack an ensemble, its wheels and run_submission.py for an offline notebook."),
}


class LazyGroup(BiomassGroup):
    """The `biomass` group: lists COMMANDS from the table, builds a command from its module when it is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, function, text = COMMANDS[name]
        command = getattr(importlib.import_module(f"biomass_cache.cli.{module}"), function)
        return typer.main.get_command(script_app(command, name, text))

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """typer suggests a close name from the commands it holds, none here: suggest from COMMANDS instead."""
        try:
            return super().resolve_command(ctx, args)
        except UsageError as e:
            matches = get_close_matches(args[0], COMMANDS) if args else []
            if matches and "Did you mean" not in e.message:
                e.message = f"{e.message.rstrip('.')}. Did you mean {', '.join(repr(m) for m in matches)}?"
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])


app = typer.Typer(
    help="Pasture biomass from quadrat photos: frozen DINOv3 tokens cached in Zarr, light heads trained on top.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich markup would eat the bracketed defaults, e.g. "[the folder of --out]"
    cls=LazyGroup,  # user errors: one `error:` line, exit status 2 (errors.py)
)


@app.callback()
def options(ctx: typer.Context,
            debug: bool = typer.Option(False, "--debug", help="Show a traceback for user errors too "
                                       "(also: BIOMASS_DEBUG=1).")) -> None:
    """Options every command shares (the app's help text is the Typer's)."""
    ctx.meta[DEBUG_KEY] = debug


def main() -> None:
    keep_freed_memory()
    run_app(app)


def run(command: Callable[..., None]) -> None:
    """Run one command function as a script (extract_features.py, train_heads.py, submit.py): the same process
    set-up and one-line user errors as `biomass`."""
    keep_freed_memory()
    run_app(script_app(command))
