"""The code location that workspace.yaml names loads with the pinned Dagster."""

import subprocess
import sys
from pathlib import Path

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_load():
    from lm_saes_dagster.definitions import defs

    assert isinstance(defs, dg.Definitions)
    assert dg.__version__ == "1.13.27"


def test_workspace_validates_with_the_dagster_cli():
    out = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
