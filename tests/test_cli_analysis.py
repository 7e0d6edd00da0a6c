"""The shipped quickstart analysis configs through the CLI: `lm-saes analyze`, `dla`, then `show feature` and `list`
read what they stored. A small TopK dictionary on layer 6 of the real SmolLM2 stands in for the trained one."""

from pathlib import Path

import torch
from typer.testing import CliRunner

from lm_saes_core.cli import app
from lm_saes_core.config import load_config
from lm_saes_core.models import SAEConfig, SparseAutoEncoder
from lm_saes_core.runners import AutoInterpSettings
from lm_saes_core.store import RecordStoreConfig, open_store

CONFIGS = Path(__file__).parent.parent / "configs" / "quickstart"
HOOK = "blocks.6.hook_resid_post"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_analyze_dla_show_and_list_through_the_cli_on_the_shipped_configs(tmp_path, smollm2_dir):
    torch.manual_seed(0)
    cfg = SAEConfig(d_model=576, d_sae=48, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="topk", top_k=4)
    cfg = cfg.model_copy(update={"norm_activation": "inference"})
    sae_dir = SparseAutoEncoder.from_config(cfg).save_pretrained(tmp_path / "sae")
    store_path = tmp_path / "records.sqlite"
    shared = ["--set", f"sae.pretrained_name_or_path={sae_dir}", "--set", f"store.sqlite_path={store_path}"]

    analyzed = invoke(
        "analyze", str(CONFIGS / "analyze.yaml"), *shared, "--set", "analyzer.total_analyzing_tokens=1024"
    )
    assert analyzed.exit_code == 0, analyzed.output
    assert "analysed 48 features of quickstart-topk" in analyzed.stdout
    attributed = invoke("dla", str(CONFIGS / "dla.yaml"), *shared)
    assert attributed.exit_code == 0, attributed.output
    assert "attributed 48 features of quickstart-topk" in attributed.stdout

    with open_store(RecordStoreConfig(sqlite_path=str(store_path))) as store:
        assert store.count_features_with_analysis("quickstart-topk", "quickstart") == 48
        features = list(store.iter_features("quickstart-topk", "quickstart", with_samples=False))
        assert all(feature.logits is not None and len(feature.logits.top_positive) == 10 for feature in features)
        active = next(feature.index for feature in features if feature.analysis().act_times > 0)

    view = ["-s", "quickstart", "--store-path", str(store_path)]
    shown = invoke("show", "feature", "quickstart-topk", str(active), *view)
    assert shown.exit_code == 0, shown.output
    assert "top_activations" in shown.stdout and "«" in shown.stdout  # a context with its activating tokens marked
    listed = invoke("list", "--store-path", str(store_path))
    assert listed.exit_code == 0, listed.output
    assert "quickstart-topk" in listed.stdout
    out_of_range = invoke("show", "feature", "quickstart-topk", "48", *view)
    assert out_of_range.exit_code != 0 and "48" in out_of_range.output


def test_the_autointerp_config_validates():
    settings = load_config(AutoInterpSettings, CONFIGS / "autointerp.yaml")
    assert settings.auto_interp.base_url == "http://127.0.0.1:8000/v1" and settings.features == list(range(8))
