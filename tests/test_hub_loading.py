"""Published dictionaries loaded by name (`hf://OWNER/REPO[/SUBFOLDER][@REVISION]`) from a Hugging Face hub cache laid
out as huggingface_hub lays it out (tests/hub_cache.py), offline: our own layout (as Llama Scope publishes it, one
folder per dictionary), a SAELens SAE and a sparsify hookpoint, all made from one TopK SAE on layer 6 of the real
SmolLM2, load with the very weights published and encode, reconstruct and evaluate real activations exactly as the
original does; revisions resolve through refs/, and what the cache lacks is one named error."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from hub_cache import folder_files, publish
from real_activations import heldout_metrics, smollm2_cache
from safetensors.torch import load_file
from typer.testing import CliRunner

from lm_saes_core.activation.reader import CachedActivations
from lm_saes_core.cli import app
from lm_saes_core.config import ConfigError, load_config
from lm_saes_core.interop import export_saelens, export_sparsify, import_sparsify
from lm_saes_core.models import PretrainedSAE, SAEConfig, SparseAutoEncoder, load_sparse_dictionary
from lm_saes_core.models.hub import HubDictionaryNotFoundError
from lm_saes_core.runners.evaluate import EvaluateSAESettings
from lm_saes_core.store import RecordStoreConfig, open_store

HOOK = "blocks.6.hook_resid_post"
D_MODEL, D_SAE, K = 576, 1152, 32
TOKENS = 128 * 12
CONFIGS = Path(__file__).parent.parent / "configs" / "quickstart"

OURS_REPO, OURS_FOLDER = "OpenMOSS-Team/SmolLM2-135M-LXR-2x", "SmolLM2-135M-L6R-2x"  # Llama Scope's naming
SAELENS_REPO, SAELENS_FOLDER = "smollm2-saes/SmolLM2-135M-res-2x", HOOK
SPARSIFY_REPO, SPARSIFY_FOLDER = "EleutherAI/sae-SmolLM2-135M-2x", "layers.6"


# ---------------------------------------------------------------- a real-looking dictionary, published three ways


@pytest.fixture(scope="module")
def activation_cache(tmp_path_factory) -> Path:
    return smollm2_cache(tmp_path_factory.mktemp("hub-activations"), HOOK, "train[100:200]", TOKENS)


@pytest.fixture(scope="module")
def activations(activation_cache: Path) -> torch.Tensor:
    """(N, 576) raw residual-stream activations of SmolLM2's layer 6 at the valid tokens of the cache's first chunk."""
    reader = CachedActivations(activation_cache)
    chunk = reader.load_chunk(reader.chunks[0])
    return chunk[HOOK][chunk["mask"]].float()


@pytest.fixture(scope="module")
def original(activations: torch.Tensor) -> SparseAutoEncoder:
    """A TopK SAE whose encoder reads real activation directions around the data mean and whose decoder is the ridge
    regression of the activations on those features over the first 700 tokens (held-out explained variance ~0.67)."""
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_model=D_MODEL,
        d_sae=D_SAE,
        hook_point_in=HOOK,
        hook_point_out=HOOK,
        act_fn="topk",
        top_k=K,
        norm_activation="inference",
        sparsity_include_decoder_norm=False,
    )
    model = SparseAutoEncoder.from_config(cfg)
    mean = activations.mean(0)
    directions = activations[torch.randperm(len(activations))[:D_SAE]] - mean
    directions = directions / directions.norm(dim=1, keepdim=True)
    with torch.no_grad():
        model.W_E.copy_(directions.T)
        model.b_E.copy_(-(mean @ directions.T))
        model.b_D.copy_(mean)
        features = model.encode_batch({HOOK: activations[:700]}).double()
        gram = features.T @ features
        ridge = 1e-2 * gram.diagonal().mean() * torch.eye(D_SAE, dtype=torch.float64)
        model.W_D.copy_(torch.linalg.solve(gram + ridge, features.T @ (activations[:700] - mean).double()))
    return model.eval()


@pytest.fixture(scope="module")
def published(tmp_path_factory, original: SparseAutoEncoder) -> dict:
    """The hub cache, and per layout (hf:// name, the local folder of the same files, its commit)."""
    root = tmp_path_factory.mktemp("published")
    cache = root / "hub"
    ours = original.save_pretrained(root / "ours" / OURS_FOLDER)
    saelens = export_saelens(original, root / "saelens" / SAELENS_FOLDER, model_name="smollm2-135m")
    sparsify = export_sparsify(original, root / "sparsify" / SPARSIFY_FOLDER)
    run_config = root / "sparsify" / "config.json"  # a sparsify run's TrainConfig, beside its hookpoint folders
    run_config.write_text(json.dumps({"sae": {"k": K, "num_latents": D_SAE}, "hookpoints": [SPARSIFY_FOLDER]}))
    return {
        "cache": cache,
        "lm-saes": (
            f"hf://{OURS_REPO}/{OURS_FOLDER}",
            ours,
            publish(cache, OURS_REPO, folder_files(ours, OURS_FOLDER)),
        ),
        "saelens": (
            f"hf://{SAELENS_REPO}/{SAELENS_FOLDER}",
            saelens,
            publish(cache, SAELENS_REPO, folder_files(saelens, SAELENS_FOLDER)),
        ),
        "sparsify": (
            f"hf://{SPARSIFY_REPO}/{SPARSIFY_FOLDER}",
            sparsify,
            publish(cache, SPARSIFY_REPO, folder_files(sparsify, SPARSIFY_FOLDER) | {"config.json": run_config}),
        ),
    }


@pytest.fixture
def offline_cache(monkeypatch, published) -> Path:
    """HF_HUB_CACHE at the published repositories, HF_HUB_OFFLINE=1: the cache is all there is."""
    monkeypatch.setenv("HF_HUB_CACHE", str(published["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return published["cache"]


@pytest.fixture(scope="module")
def original_metrics(published, activation_cache: Path) -> dict[str, float]:
    return heldout_metrics(published["lm-saes"][1], activation_cache, HOOK, TOKENS, batch_size=512)


def outputs(model: SparseAutoEncoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_batch({HOOK: x}), model.reconstruct(x)[HOOK]


# ---------------------------------------------------------------- loading by name


@pytest.mark.parametrize("layout", ["lm-saes", "saelens"])
def test_own_and_saelens_dictionaries_load_by_name_as_the_original(
    layout, offline_cache, published, original, activations, activation_cache, original_metrics
):
    name, local, commit = published[layout]
    repo, folder = {"lm-saes": (OURS_REPO, OURS_FOLDER), "saelens": (SAELENS_REPO, SAELENS_FOLDER)}[layout]
    sae = PretrainedSAE(pretrained_name_or_path=name)
    located = sae.locate()
    snapshot = offline_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    assert located.layout == layout and located.path.resolve() == (snapshot / folder).resolve()
    assert located.source == f"{name}@{commit}"

    loaded = sae.load()
    assert isinstance(loaded, SparseAutoEncoder) and not loaded.training
    assert loaded.cfg.hooks_in == [HOOK] and loaded.cfg.top_k == K and loaded.cfg.norm_activation == "inference"
    expected = original.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for tensor_name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[tensor_name]), tensor_name

    features, reconstruction = outputs(loaded, activations)
    original_features, original_reconstruction = outputs(original, activations)
    assert torch.equal(features, original_features) and torch.equal(reconstruction, original_reconstruction)
    assert ((features > 0).sum(-1) == K).all()  # real activations, every token its k features
    cfg, record = sae.read_config()
    assert cfg == loaded.cfg.model_copy(update={"device": cfg.device})
    assert record["hook_point_in"] == HOOK and record["d_sae"] == D_SAE

    metrics = heldout_metrics(name, activation_cache, HOOK, TOKENS, batch_size=512)
    assert metrics == original_metrics
    assert 0.6 < metrics["metrics/explained_variance"] < 0.9 and metrics["metrics/l0"] == K


def test_sparsify_hookpoint_loads_by_name_with_the_published_weights(
    offline_cache, published, original, activations, activation_cache, original_metrics
):
    """sparsify keeps b_dec's subtraction inside the encoder bias, so the loaded b_E is the published bias minus
    b_dec @ W_E (float64, then rounded): exactly what reading the same folder locally gives, and the original's b_E
    up to that rounding."""
    name, local, commit = published["sparsify"]
    sae = PretrainedSAE(pretrained_name_or_path=name)
    assert sae.locate().layout == "sparsify" and sae.source() == f"{name}@{commit}"
    loaded = sae.load()
    files = load_file(local / "sae.safetensors")
    assert torch.equal(loaded.W_E, files["encoder.weight"].T) and torch.equal(loaded.W_D, files["W_dec"])
    assert torch.equal(loaded.b_D, files["b_dec"]) and torch.equal(loaded.W_D, original.W_D)
    assert torch.equal(loaded.b_D, original.b_D)
    torch.testing.assert_close(loaded.b_E, original.b_E, rtol=0, atol=2e-6)
    cfg, record = sae.read_config()
    assert cfg == loaded.cfg and record["top_k"] == K and record["hook_point_in"] == HOOK
    local_copy = import_sparsify(local, dtype=torch.float32)
    for tensor_name, value in local_copy.state_dict().items():
        assert torch.equal(loaded.state_dict()[tensor_name], value), tensor_name

    features, reconstruction = outputs(loaded, activations)
    local_features, local_reconstruction = outputs(local_copy, activations)
    assert torch.equal(features, local_features) and torch.equal(reconstruction, local_reconstruction)
    original_features, original_reconstruction = outputs(original, activations)
    torch.testing.assert_close(features, original_features, rtol=0, atol=1e-4)
    torch.testing.assert_close(reconstruction, original_reconstruction, rtol=0, atol=1e-4)

    metrics = heldout_metrics(name, activation_cache, HOOK, TOKENS, batch_size=512)
    assert metrics == heldout_metrics(local, activation_cache, HOOK, TOKENS, batch_size=512)
    for key in ("metrics/explained_variance", "metrics/l0", "losses/mse_loss", "metrics/l2_norm_error"):
        assert metrics[key] == pytest.approx(original_metrics[key], rel=1e-5), key


# ---------------------------------------------------------------- revisions


def test_a_revision_pin_resolves_through_refs(tmp_path, monkeypatch):
    """A dictionary at a repository's root, published twice: tag v1 -> the first commit, main -> the second."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = SAEConfig(d_model=D_MODEL, d_sae=64, hook_point_in=HOOK, hook_point_out=HOOK, norm_activation="inference")
    commits = []
    for version, ref in enumerate(("v1", "main")):
        torch.manual_seed(version)
        model = SparseAutoEncoder.from_config(cfg)
        saved = model.save_pretrained(tmp_path / f"v{version}")
        commits.append((publish(tmp_path / "hub", "someone/one-sae", folder_files(saved, ""), refs=(ref,)), model))
    (first, first_model), (second, second_model) = commits
    assert first != second

    for name, (commit, model) in {
        "hf://someone/one-sae": (second, second_model),
        "hf://someone/one-sae@main": (second, second_model),
        "hf://someone/one-sae@v1": (first, first_model),
        f"hf://someone/one-sae@{first}": (first, first_model),
    }.items():
        sae = PretrainedSAE(pretrained_name_or_path=name)
        assert sae.source() == f"hf://someone/one-sae@{commit}", name
        assert torch.equal(sae.load().W_E, model.W_E), name
    assert torch.equal(load_sparse_dictionary("hf://someone/one-sae@v1").W_D, first_model.W_D)

    with pytest.raises(HubDictionaryNotFoundError) as missing:
        load_sparse_dictionary("hf://someone/one-sae@v2")
    message = str(missing.value)
    assert "no complete dictionary for the root of someone/one-sae at revision 'v2'" in message
    assert "no revision 'v2' (cached refs: ['main', 'v1'])" in message
    assert "`hf download someone/one-sae --revision v2`" in message
    unknown_commit = "0" * 40
    with pytest.raises(HubDictionaryNotFoundError, match=f"no snapshot of commit {unknown_commit}"):
        load_sparse_dictionary(f"hf://someone/one-sae@{unknown_commit}")


# ---------------------------------------------------------------- what the cache lacks


def test_a_repository_missing_from_the_cache_is_one_named_error(offline_cache):
    with pytest.raises(HubDictionaryNotFoundError) as missing:
        PretrainedSAE(pretrained_name_or_path="hf://nobody/absent-saes/layers.6@v3").load()
    message = str(missing.value)
    assert message.startswith("hf://nobody/absent-saes/layers.6@v3: no complete dictionary for the folder 'layers.6'")
    assert "of nobody/absent-saes at revision 'v3'" in message
    assert f"in the Hugging Face cache {offline_cache} (HF_HUB_OFFLINE is set: nothing is downloaded)" in message
    assert f"the cache has no copy of nobody/absent-saes (no {offline_cache}/models--nobody--absent-saes)" in message
    assert "`hf download nobody/absent-saes --include 'layers.6/*' --revision v3`" in message
    assert isinstance(missing.value, FileNotFoundError)  # and a UserError: the CLI prints it without a traceback


def test_a_missing_subfolder_names_what_the_snapshot_has(offline_cache, published):
    commit = published["sparsify"][2]
    with pytest.raises(HubDictionaryNotFoundError) as missing:
        load_sparse_dictionary(f"hf://{SPARSIFY_REPO}/layers.9")
    assert f"snapshot {commit} has no folder 'layers.9' (its top level: ['config.json', 'layers.6'])" in str(
        missing.value
    )
    with pytest.raises(HubDictionaryNotFoundError) as run_root:  # a sparsify run's root is no dictionary
        load_sparse_dictionary(f"hf://{SPARSIFY_REPO}")
    assert "holds no saved sparse dictionary" in str(run_root.value)
    assert "Its subfolders ['layers.6'] hold dictionaries: name one" in str(run_root.value)


def test_an_interrupted_download_is_named_not_loaded(tmp_path, monkeypatch, published):
    """The weights' link is missing from the snapshot that the cached tree listing says has it."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = published["saelens"][1]
    commit = publish(tmp_path, SAELENS_REPO, folder_files(local, SAELENS_FOLDER))
    weights = tmp_path / f"models--{SAELENS_REPO.replace('/', '--')}" / "snapshots" / commit / HOOK
    (weights / "sae_weights.safetensors").unlink()
    with pytest.raises(HubDictionaryNotFoundError) as missing:
        load_sparse_dictionary(f"hf://{SAELENS_REPO}/{SAELENS_FOLDER}")
    assert f"1 file(s) are missing ({HOOK}/sae_weights.safetensors)" in str(missing.value)
    assert f"`hf download {SAELENS_REPO} --include '{HOOK}/*'`" in str(missing.value)


# ---------------------------------------------------------------- settings and the CLI


def write_evaluate_settings(path: Path, name: str, activation_cache: Path) -> Path:
    settings = {
        "sae": {"pretrained_name_or_path": name},
        "sae_name": "published",
        "activation_factory": {
            "sources": [{"type": "activations", "name": "heldout", "path": str(activation_cache)}],
            "target": "activations-1d",
            "hook_points": [HOOK],
            "batch_size": 512,
        },
        "eval": {"total_eval_tokens": TOKENS, "compute_downstream": False},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("hf://just-an-owner", r"expected hf://OWNER/REPO\[/SUBFOLDER\]\[@REVISION\]"),
        ("hf://someone/saes/../other", r"subfolder part '\.\.' is not allowed"),
        ("hf://some--one/saes/layer.6", r"owner 'some--one' is not a Hugging Face name"),
        ("hf://someone/saes/layer.6@", r"revision '' is not a branch, tag, commit hash or refs/pr/N"),
        ("hf://someone/saes@v1/layer.6", r"revision 'v1/layer.6' .* the revision comes last"),
        (
            "saelens://gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_71",
            r"unsupported scheme saelens://.*pretrained_saes\.yaml and write hf://<its repo_id>/<the sae_id's path>",
        ),
    ],
)
def test_a_malformed_name_is_refused_when_the_settings_load(tmp_path, name, message):
    settings = write_evaluate_settings(tmp_path / "evaluate.yaml", name, tmp_path)
    with pytest.raises(ConfigError, match=r"sae\.pretrained_name_or_path[\s\S]*" + message):
        load_config(EvaluateSAESettings, settings)


def test_settings_take_a_hub_name_and_resolve_it_only_when_run(tmp_path, monkeypatch, activation_cache):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "hf://nobody/absent-saes/layers.6"
    settings = load_config(EvaluateSAESettings, write_evaluate_settings(tmp_path / "e.yaml", name, activation_cache))
    assert settings.sae.pretrained_name_or_path == name and not (tmp_path / "empty-cache").exists()

    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "e.yaml")], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output  # a user error: one message, no traceback
    assert f"{name}: no complete dictionary for the folder 'layers.6'" in result.output
    assert "hf download nobody/absent-saes --include 'layers.6/*'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_analyze_a_saelens_dictionary_by_name_through_the_cli(tmp_path, monkeypatch, smollm2_dir):
    """`lm-saes analyze` on the shipped quickstart config with `sae.pretrained_name_or_path=hf://...`: the record
    store keeps the name pinned to the commit, and the config the dictionary was imported with."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = SAEConfig(d_model=D_MODEL, d_sae=48, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="topk", top_k=4)
    small = SparseAutoEncoder.from_config(cfg.model_copy(update={"norm_activation": "inference"}))
    exported = export_saelens(small, tmp_path / "saelens" / HOOK, model_name="smollm2-135m")
    commit = publish(tmp_path / "hub", SAELENS_REPO, folder_files(exported, SAELENS_FOLDER))
    name = f"hf://{SAELENS_REPO}/{SAELENS_FOLDER}"
    store_path = tmp_path / "records.sqlite"

    analyzed = CliRunner().invoke(
        app,
        [
            "analyze",
            str(CONFIGS / "analyze.yaml"),
            "--set",
            f"sae.pretrained_name_or_path={name}",
            "--set",
            f"store.sqlite_path={store_path}",
            "--set",
            "analyzer.total_analyzing_tokens=1024",
        ],
        env={"COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert analyzed.exit_code == 0, analyzed.output
    assert "analysed 48 features of quickstart-topk" in analyzed.stdout
    with open_store(RecordStoreConfig(sqlite_path=str(store_path))) as store:
        record = store.get_dictionary("quickstart-topk", "quickstart")
        assert record.path == f"{name}@{commit}"
        assert record.cfg["hook_point_in"] == HOOK and record.cfg["d_sae"] == 48 and record.cfg["top_k"] == 4
        assert store.count_features_with_analysis("quickstart-topk", "quickstart") == 48
