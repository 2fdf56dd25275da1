#!/usr/bin/env python
"""Submission: ensemble trained heads on the test images, write a validated submission.csv (= `biomass submit`)."""

import typer

from biomass_cache.submission import submit_command

if __name__ == "__main__":
    typer.run(submit_command)
