#!/usr/bin/env python
"""Submission: ensemble trained heads on the test images, write a validated submission.csv (= `biomass submit`)."""

from biomass_cache.cli import run
from biomass_cache.cli.submit import submit_command

if __name__ == "__main__":
    run(submit_command)
