"""What a materialisation links to besides its own files: the pictures written next to a dictionary and its
evaluation, and the feature browser's page of the dictionary (`lm-saes serve` over the pipeline's record store;
`LM_SAES_BROWSER_URL` says where it runs, http://127.0.0.1:8000 by default)."""

import os
from pathlib import Path
from urllib.parse import quote

import dagster as dg

from lm_saes_core.runners.evaluate import density_path
from lm_saes_core.training.run_log import CURVES_FILE

BROWSER_URL_ENV = "LM_SAES_BROWSER_URL"
DEFAULT_BROWSER_URL = "http://127.0.0.1:8000"


def browser_url(pipeline: str, item: str) -> str:
    base = os.environ.get(BROWSER_URL_ENV, DEFAULT_BROWSER_URL).rstrip("/")
    return f"{base}/dictionaries/{quote(item, safe='')}?series={quote(pipeline, safe='')}"


def picture_links(dictionary: Path, evaluation: Path | None = None) -> dict[str, dg.MetadataValue]:
    """`training_curves` and `feature_density` as path metadata, for those that exist."""
    links = {}
    if (dictionary / CURVES_FILE).is_file():
        links["training_curves"] = dg.MetadataValue.path(str(dictionary / CURVES_FILE))
    if evaluation is not None and density_path(evaluation).is_file():
        links["feature_density"] = dg.MetadataValue.path(str(density_path(evaluation)))
    return links


def summary_markdown(pipeline: str, item: str, figures: dict[str, float], links: dict[str, dg.MetadataValue]) -> str:
    """A table of the key figures, then the pictures and the browser page as links."""
    rows = "\n".join(f"| {name} | {value:.4g} |" for name, value in figures.items())
    files = "".join(f"\n- {name.replace('_', ' ')}: `{value.value}`" for name, value in links.items())
    return (
        f"| {item} | |\n|---|---|\n{rows}\n\n- features in the browser: [{browser_url(pipeline, item)}]"
        f"({browser_url(pipeline, item)}) (run `lm-saes serve` over the pipeline's record store){files}"
    )
