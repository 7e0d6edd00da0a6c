"""The Dagster code location loaded by `workspace.yaml`.

Assets for each pipeline under `configs/pipelines/` are built here by the Dagster layer (corpus -> tokens ->
activations -> dictionary -> evaluation -> analyses); until then the location loads with no assets.
"""

import dagster as dg

defs = dg.Definitions(assets=[])
