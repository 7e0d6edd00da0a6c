"""Pipeline configs for the Dagster tests: the quickstart pipeline shrunk to seconds on the real SmolLM2."""

HOOK = "blocks.3.hook_resid_post"
TRANSCODER_IN, TRANSCODER_OUT = "blocks.3.hook_mlp_in", "blocks.3.hook_mlp_out"
"""Layer 3's MLP. Not hook_resid_mid: the evaluation's splice hooks its input, and resid_mid is not replaceable."""


def small_pipeline(
    name: str = "small",
    *,
    cached_tokens: int = 64 * 48,
    training_tokens: int = 512 * 48,
    act_fns: tuple[str, ...] = ("topk", "batchtopk"),
    buffer_size: int = 2048,
    extra_hooks: tuple[str, ...] = (),
) -> dict:
    """Layer 3 (and `extra_hooks`, cached but without dictionaries), context 64, one tiny dictionary per activation
    function (each with its own trainer settings), 512 evaluated tokens of which 128 are spliced into the model."""
    sae = {"d_model": 576, "expansion_factor": 2, "hook_point_in": HOOK, "hook_point_out": HOOK, "top_k": 16}
    trainer = {"lr": 4e-3, "lr_warm_up_steps": 0.1, "total_training_tokens": training_tokens,
               "log_frequency": 16, "n_checkpoints": 0}  # fmt: skip
    return {
        "name": name,
        "model": {"model_name": "smollm2-135m"},
        "dataset": {"dataset_name_or_path": "python-docs", "split": "train[:90%]", "shuffle_seed": 0},
        "eval_dataset": {"dataset_name_or_path": "python-docs", "split": "train[90%:]"},
        "hook_points": [HOOK, *extra_hooks],
        "activations": {
            "context_size": 64,
            "total_tokens": cached_tokens,
            "model_batch_size": 8,
            "n_samples_per_chunk": 16,
        },  # fmt: skip
        "dictionaries": {
            act_fn: {
                "sae": {**sae, "act_fn": act_fn},
                "trainer": dict(trainer),
                "batch_size": 512,
                "buffer_size": buffer_size,
            }  # fmt: skip
            for act_fn in act_fns
        },
        "evaluation": {"total_eval_tokens": 512, "downstream_tokens": 128},
        "quality": {"min_explained_variance": 0.5, "max_dead_fraction": 1.0, "min_l0": 1, "max_l0": 64},
    }


def transcoder_item(
    hook_in: str = TRANSCODER_IN, hook_out: str = TRANSCODER_OUT, *, training_tokens: int = 512 * 48
) -> dict:
    """A tiny TopK transcoder item (layer 3's MLP by default): both hooks must be among the pipeline's hook_points."""
    return {
        "sae": {"d_model": 576, "expansion_factor": 2, "hook_point_in": hook_in, "hook_point_out": hook_out,
                "act_fn": "topk", "top_k": 16},
        "trainer": {"lr": 4e-3, "lr_warm_up_steps": 0.1, "total_training_tokens": training_tokens,
                    "log_frequency": 16, "n_checkpoints": 0},
        "batch_size": 512,
        "buffer_size": 2048,
    }  # fmt: skip
