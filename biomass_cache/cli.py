"""The `biomass` command line: one typer app, one sub-command per pipeline step.

The top-level scripts (extract_features.py, train_heads.py, submit.py) run the same command functions.
"""

from __future__ import annotations

import typer

from biomass_cache.bundle import bundle_command
from biomass_cache.demo import demo_command
from biomass_cache.errors import DEBUG_KEY, BiomassGroup
from biomass_cache.extract_cli import extract_command
from biomass_cache.lora.cli import lora_command
from biomass_cache.predict import predict_command
from biomass_cache.pseudo import pseudo_command
from biomass_cache.reduce import reduce_command
from biomass_cache.runtime import keep_freed_memory
from biomass_cache.submission import score_command, submit_command
from biomass_cache.synth import synth_command
from biomass_cache.train_cli import train_command
from biomass_cache.tune import tune_command
from biomass_cache.verify import verify_command

app = typer.Typer(
    help="Pasture biomass from quadrat photos: frozen DINOv3 tokens cached in Zarr, light heads trained on top.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich markup would eat the bracketed defaults, e.g. "[the folder of --out]"
    cls=BiomassGroup,  # user errors: one `error:` line, exit status 2 (errors.py)
)


@app.callback()
def options(ctx: typer.Context,
            debug: bool = typer.Option(False, "--debug", help="Show a traceback for user errors too "
                                       "(also: BIOMASS_DEBUG=1).")) -> None:
    """Options every command shares (the app's help text is the Typer's)."""
    ctx.meta[DEBUG_KEY] = debug


COMMANDS = [
    ("demo", demo_command, "Run the whole pipeline end to end on synthetic data (random backbone), on the CPU."),
    ("synth", synth_command, "Write a synthetic Kaggle-format pasture dataset (the embedded demo data)."),
    ("extract", extract_command, "Stage one: run the frozen backbone over every view, write tokens to a Zarr store."),
    ("verify", verify_command, "Read back a token store; report corrupt chunks and samples not extracted."),
    ("reduce", reduce_command, "Derive a smaller token store: per-layer PCA channels and a pooled patch grid."),
    ("train", train_command, "Stage two: train readout heads on cached tokens with grouped k-fold CV."),
    ("tune", tune_command, "Search training settings with Optuna on a token cache; write the winner as best.toml."),
    ("lora", lora_command, "Train LoRA adapters + a head with the backbone run live (train_heads.py --lora)."),
    ("submit", submit_command, "Ensemble trained heads on the test images and write a validated submission.csv."),
    ("pseudo", pseudo_command, "Pseudo-label the test images with an ensemble; train heads on train + test tokens."),
    ("score", score_command, "Score a submission against labels (competition_r2 and log_r2)."),
    ("predict", predict_command, "Predict biomass for a plain folder of quadrat photos (no CSV needed)."),
    ("bundle", bundle_command, "Pack an ensemble, its wheels and run_submission.py for an offline notebook."),
]
for name, fn, text in COMMANDS:
    app.command(name, help=text)(fn)


def main() -> None:
    keep_freed_memory()
    app()


if __name__ == "__main__":
    main()
