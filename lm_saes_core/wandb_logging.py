"""A thin Weights & Biases wrapper: start (or continue) a run from `WandbConfig`; the trainer calls `run.log`.

`wandb` is imported only when a run is started (it is slow to import). Offline runs work: set
`WANDB_MODE=offline` or `WandbConfig.wandb_mode="offline"`; the run directory is synced later with `wandb sync`.
"""

from typing import Any, Literal

from lm_saes_core.config import BaseConfig


class WandbConfig(BaseConfig):
    wandb_project: str = "gpt2-sae-training"
    exp_name: str | None = None
    wandb_entity: str | None = None
    wandb_run_id: str | None = None
    """Continue this run (e.g. the id stored in a checkpoint, see `Trainer.checkpoint_wandb_run_id`)."""
    wandb_resume: Literal["allow", "must", "never", "auto"] = "never"
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """None leaves the choice to wandb (its WANDB_MODE variable, online by default)."""
    wandb_dir: str | None = None


def start_wandb_run(cfg: WandbConfig, config: dict[str, Any] | None = None):
    """`wandb.init` from the config; continuing `wandb_run_id` requires `wandb_resume` other than "never"."""
    import wandb

    if cfg.wandb_run_id is not None and cfg.wandb_resume == "never":
        raise ValueError("wandb_run_id is set but wandb_resume='never'; use 'must' (or 'allow') to continue that run")
    return wandb.init(
        project=cfg.wandb_project,
        name=cfg.exp_name,
        entity=cfg.wandb_entity,
        id=cfg.wandb_run_id,
        resume=None if cfg.wandb_resume == "never" else cfg.wandb_resume,
        mode=cfg.wandb_mode,
        dir=cfg.wandb_dir,
        config=config,
    )
