"""The training loop: one optimiser step per batch, metrics every `log_frequency` steps (and after the last step),
resumable checkpoints, the final weights in `exp_result_path`.

Resuming (`fit(..., resume_from=checkpoint_dir)`) restores the weights, optimiser, scheduler, RNG states, dead-latent
statistics, counters and the data cursor, then skips the batches the checkpointed run had consumed. The caller must
therefore pass a freshly created stream that yields the same batches in the same order as the original one (a
deterministic, seeded stream); a shorter stream is an error. Resumed runs reproduce uninterrupted runs bitwise on CPU.
"""

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lm_saes_core.config import ConfigError
from lm_saes_core.models import LossCoefficients, SparseDictionary, load_sparse_dictionary
from lm_saes_core.models.base import CONFIG_FILE, read_dictionary_config
from lm_saes_core.models.collectives import mean_over_parts
from lm_saes_core.models.feature_parallel import (
    FeatureShards,
    gather_features,
    gather_model,
    optimizer_axes,
    shard_features,
    shard_model,
    shard_optimizer_state,
)
from lm_saes_core.models.head_parallel import HeadShards, gather_heads, shard_heads, whole_heads_config
from lm_saes_core.training.batches import Batch, Prefetched, count_tokens, to_device
from lm_saes_core.training.checkpoint import (
    capture_rng_states,
    find_latest_checkpoint,
    load_trainer_state,
    restore_rng_states,
    save_checkpoint,
    save_final_dictionary,
    save_sharded_checkpoint,
)
from lm_saes_core.training.config import TrainerConfig
from lm_saes_core.training.data_parallel import DataParallel
from lm_saes_core.training.memory import freed_memory_kept
from lm_saes_core.training.metrics import DeadLatentStatistics, FeatureActivity, MetricWindow
from lm_saes_core.training.optim import GradShards, build_optimizer, build_scheduler, clip_rms_grad_norm_
from lm_saes_core.training.schedules import annealed_k, checkpoint_steps, resolve_steps, warmup_factor
from lm_saes_core.training.sharded_checkpoint import (
    SHARDED_DIR,
    dictionary_splits,
    is_sharded_checkpoint,
    loaded_states,
    read_tensors,
    state_tensors,
)

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """The loss or the gradients became NaN/inf; raised before the optimiser step, so weights stay finite."""


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    n_tokens: int
    stream_exhausted: bool
    output_path: Path
    checkpoints: list[Path] = field(default_factory=list)
    last_metrics: dict[str, float] = field(default_factory=dict)
    reused: bool = False
    """True when a finished run with identical settings was found and nothing was trained."""
    resumed_from_step: int | None = None
    """The step of the checkpoint this run continued from; None when it started from step 0."""


@dataclass
class _Progress:
    """Counters saved in every checkpoint."""

    step: int  # optimiser steps taken
    n_tokens: int  # valid tokens trained on
    batches_consumed: int  # the data cursor
    total_steps: int
    tokens_per_batch: int


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        data_parallel: DataParallel | None = None,
        prefetch: int = 2,
        feature_shards: FeatureShards | None = None,
        head_shards: HeadShards | None = None,
    ):
        """`data_parallel`: this process's place in a torchrun launch (see `training.data_parallel`); None alone.
        `prefetch`: batches a background thread reads ahead of the step (`batches.Prefetched`); 0 reads each batch
        in the training thread when the step asks for it. The batches and their order are the same either way.
        `feature_shards`: this process's shard of a feature-parallel dictionary (`init_parallel`): `fit` is given
        the whole dictionary on every process, trains this shard of it and leaves the whole trained one there.
        `head_shards`: this process's group of a crosscoder's heads (`init_parallel`), likewise; its batches need
        only hold its heads' hooks."""
        self.cfg = cfg
        self.prefetch = prefetch
        self.dp = data_parallel
        self.shards = feature_shards
        self.heads = head_shards
        self.is_main = data_parallel is None or data_parallel.is_main
        self.world_size = 1 if data_parallel is None else data_parallel.world_size
        """Batches are this rank's part: a step trains on world_size times as many tokens."""
        self.penalty = cfg.loss.penalty()
        """The sparsity penalty, chosen once from the loss config."""

    def fit(
        self,
        model: SparseDictionary,
        stream: Iterable[Batch],
        *,
        wandb_run: Any = None,
        resume_from: str | Path | None = None,
        progress_bar: tuple[str, int] = ("training", 0),
        run_settings: dict[str, Any] | None = None,
    ) -> TrainResult:
        """Train any kind of dictionary on `stream`. `progress_bar`: the progress bar's label and line (a sweep gives
        each item its own). `run_settings`: the run's settings, recorded in every checkpoint so that a later run can
        tell whether a checkpoint is its own."""
        cfg = self.cfg
        whole = model
        model.check_loss(cfg.loss)
        if self.dp is not None:
            self.dp.broadcast_model(model)
            model.batch_kth = self.dp.kth_largest
        if self._sharded:
            if resume_from is not None and is_sharded_checkpoint(resume_from):
                _load_model_config(whole, Path(resume_from))  # its parts are read into this shard's in `_resume`
            elif resume_from is not None:
                _load_model_weights(whole, Path(resume_from))  # the whole weights, then this shard's part of them
            model = self._shard(whole)
            _release(whole)  # while its parts train, the whole dictionary holds no memory
        optimizer = build_optimizer(cfg, model.parameter_groups(cfg.lr, cfg.jumprelu_lr_factor))
        dead = DeadLatentStatistics(model.n_features, cfg.loss.dead_threshold, model.cfg.device)
        if resume_from is None:
            batches, progress, scheduler = self._start(model, iter(stream), optimizer)
        else:
            batches, progress, scheduler = self._resume(model, iter(stream), optimizer, dead, Path(resume_from))
        T = progress.total_steps
        planned = checkpoint_steps(T, cfg.n_checkpoints, cfg.check_point_save_mode, cfg.checkpoint_every_steps)
        saves = [s for s in planned if s > progress.step]
        window = MetricWindow(model.n_features, model.cfg.device, len(model.cfg.hooks_out), model.group_statistics,
                              shards=self._window_shards(model), heads=self.heads)  # fmt: skip
        result = TrainResult(progress.step, T, progress.n_tokens, False, Path(cfg.exp_result_path))
        if resume_from is not None:
            result.resumed_from_step = progress.step
        last_save = time.monotonic()
        label, line = progress_bar
        bar = tqdm(total=T, initial=progress.step, desc=label, position=line, unit="step", dynamic_ncols=True,
                   disable=not self.is_main)  # fmt: skip
        with bar, freed_memory_kept(), Prefetched(batches, self.prefetch) as batches:
            while progress.step < T:
                batch = next(batches, None)
                if batch is None:
                    result.stream_exhausted = True
                    logger.warning("the activation stream ended at step %d of %d", progress.step, T)
                    break
                progress.batches_consumed += 1
                n_tokens = count_tokens(batch) * self.world_size  # every rank's part
                out, loss, lr, coefficients = self._step(
                    model, batch, n_tokens, progress, optimizer, scheduler, dead, window
                )
                progress.step += 1
                progress.n_tokens += n_tokens
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)

                if progress.step % cfg.log_frequency == 0 or progress.step == T:
                    if self.dp is not None:
                        window.combine_ranks(self.dp.sum_, self.world_size)
                    result.last_metrics = (
                        window.report()
                        | self._log_statistics(model)
                        | {
                            "details/current_learning_rate": lr,
                            "details/n_training_tokens": progress.n_tokens,
                            **{f"details/{name}": value for name, value in coefficients.as_metrics().items()},
                        }
                    )
                    if self.is_main:
                        _log_console(progress.step, T, result.last_metrics)
                    if wandb_run is not None:
                        wandb_run.log(result.last_metrics, step=progress.step)
                planned_now = bool(saves) and progress.step >= saves[0]
                if planned_now:
                    saves.pop(0)
                periodic = not planned_now and progress.step < T and self._periodic_due(last_save)
                if planned_now or periodic:
                    path = None
                    if self._sharded:  # every process writes its part
                        path = self._save_sharded(model, progress, optimizer, scheduler, dead, wandb_run,
                                                  run_settings=run_settings, periodic=periodic)  # fmt: skip
                    elif self.is_main:
                        state = self._state(progress, optimizer.state_dict(), dead.state_dict(), scheduler, wandb_run)
                        path = save_checkpoint(cfg.exp_result_path, progress.step, model, state,
                                               run_settings=run_settings, periodic=periodic)  # fmt: skip
                    if self.is_main:
                        result.checkpoints.append(path)
                    last_save = time.monotonic()

        result.steps, result.n_tokens = progress.step, progress.n_tokens
        model.batch_kth = whole.batch_kth = None  # the process group's search is for training steps only
        if self._sharded:  # every process gets the whole trained dictionary
            _restore(whole, self._gather(model).state_dict())
            whole.current_k = model.current_k
            model = whole
        if self.is_main:
            save_final_dictionary(model, result.output_path, fold_activation_scale=self._fold_on_save(model))
            path, steps, tokens = result.output_path, result.steps, result.n_tokens
            logger.info("saved the dictionary to %s after %d steps (%d tokens)", path, steps, tokens)
        if self.dp is not None:
            self.dp.barrier()  # the weights exist when any rank returns
        return result

    def _step(self, model, batch, n_tokens: int, progress: _Progress, optimizer, scheduler, dead, window):
        """Forward, backward, clip, check, update; returns the loss output and value, the LR used, the coefficients.

        Aux-K sees the latents that were dead before this batch (the statistics are updated after the step)."""
        cfg, step = self.cfg, progress.step
        batch = to_device(batch, model.cfg.device)
        model.train()
        coefficients = self._coefficients_at(step, progress.total_steps, model)
        with self._autocast(model):
            dead_latents = dead.is_dead if coefficients.auxk > 0 else None
            out = model.compute_loss(batch, coefficients, dead_latents)
        out.loss.backward()
        if self.dp is not None:
            self.dp.average_gradients(model.parameters())
        grad_norm, clipped_norm = clip_rms_grad_norm_(model.clipped_parameters(), cfg.clip_grad_norm,
                                                      self._grad_shards(model))  # fmt: skip
        loss_value, grad_value = torch.stack([out.loss.detach().float(), grad_norm.float()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {grad_value}"
            raise NonFiniteTrainingError(
                f"non-finite {what} at step {step} (batch {progress.batches_consumed} of the stream); training "
                "stopped before the optimiser step, so no weights or checkpoint were touched by it"
            )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        activity = FeatureActivity.of(model, out.feature_acts)
        dead.update(activity, n_tokens, combine=self.dp.any if self.dp is not None else None)
        window.update(out, activity, grad_norm, clipped_norm)
        return out, loss_value, lr, coefficients

    def _start(self, model, batches: Iterator[Batch], optimizer):
        """Size the run from the first batch (which is trained on, not consumed)."""
        first = next(batches, None)
        if first is None:
            raise ValueError("the activation stream is empty: nothing to train on")
        tokens_per_batch = count_tokens(first) * self.world_size
        total_steps = self.cfg.total_training_tokens // max(tokens_per_batch, 1)
        if total_steps == 0:
            raise ValueError(
                f"total_training_tokens={self.cfg.total_training_tokens} is less than one batch ({tokens_per_batch} "
                "tokens): no step to take"
            )
        logger.info("training for %d steps of %d tokens", total_steps, tokens_per_batch)
        self.cfg.check_schedule_lengths(total_steps, tokens_per_batch)
        self._warn_about_schedule_overlap(total_steps)
        existing = find_latest_checkpoint(self.cfg.exp_result_path)
        if existing is not None:
            logger.warning(
                "%s already holds checkpoints (latest %s) that this new run will mix with; pass resume_from to "
                "continue that run instead",
                self.cfg.exp_result_path,
                existing.name,
            )
        progress = _Progress(0, 0, 0, total_steps, tokens_per_batch)
        return itertools.chain([first], batches), progress, build_scheduler(self.cfg, optimizer, total_steps)

    def _resume(self, model, batches: Iterator[Batch], optimizer, dead: DeadLatentStatistics, path: Path):
        state = load_trainer_state(path)
        self._check_resumable(state, path)
        progress = _Progress(**state["progress"])
        scheduler = build_scheduler(self.cfg, optimizer, progress.total_steps)
        optimizer_state, dead_state = state["optimizer"], state["dead_latents"]
        if is_sharded_checkpoint(path):  # this process's parts of its tensors, whatever the layout that wrote it
            if not self._sharded:
                _load_model_config(model, path)
            optimizer_state, dead_state = self._read_sharded(model, optimizer, optimizer_state, path)
        elif not self._sharded:
            _load_model_weights(model, path)
        else:  # the weights were loaded whole before sharding; such a checkpoint holds whole states
            optimizer_state, dead_state = self._shard_states(model, optimizer, optimizer_state, dead_state)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        dead.load_state_dict(dead_state)
        batches = _skip(batches, progress.batches_consumed)
        restore_rng_states(state["rng"])
        logger.info("resumed from %s at step %d of %d", path, progress.step, progress.total_steps)
        return batches, progress, scheduler

    def _periodic_due(self, last_save: float) -> bool:
        """Whether a wall-clock checkpoint is due (rank 0's clock decides when the shards must gather together)."""
        minutes = self.cfg.checkpoint_every_minutes
        due = minutes is not None and time.monotonic() - last_save >= minutes * 60
        if minutes is not None and self._sharded:
            flag = torch.tensor([due], dtype=torch.int32)
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    # ---------------------------------------------------------------- feature and head parallelism

    @property
    def _sharded(self) -> bool:
        return self.shards is not None or self.heads is not None

    def _shard(self, whole: SparseDictionary) -> SparseDictionary:
        """This process's part of the whole dictionary: its heads, then its shard of their features."""
        model = whole if self.heads is None else shard_heads(whole, self.heads)
        if self.shards is not None:
            model = shard_model(model, self.shards)
            model.head_shards = self.heads
        model.batch_kth = self.shards.batch_kth if self.shards is not None else whole.batch_kth
        self.whole_heads = list(getattr(whole.cfg, "heads", []))
        return model

    def _gather(self, model: SparseDictionary) -> SparseDictionary:
        """The whole dictionary (on every process) of this process's part: its features, then every head."""
        if self.shards is not None:
            model = gather_model(model)
        return model if self.heads is None else gather_heads(model, self.heads, self.whole_heads)

    def _sum_over_parts(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over every part of the dictionary (feature shards, head ranks) of this process's `tensor`."""
        if self.shards is not None:
            tensor = self.shards.sum(tensor)
        return tensor if self.heads is None else self.heads.sum(tensor)

    def _whole_features(self, values: torch.Tensor, model: SparseDictionary) -> torch.Tensor:
        """A per-feature vector of this part (flattened over its `feature_shape`) made the whole's, flattened."""
        shape = model.feature_shape
        if self.shards is not None:
            values = gather_features(values, shape, self.shards, model.feature_blocks())
            shape = (*shape[:-1], shape[-1] * self.shards.size)
        return values if self.heads is None else self.heads.gather(values.reshape(shape)).reshape(-1)

    def _shard_states(self, model, optimizer, optimizer_state: dict, dead_state: dict) -> tuple[dict, dict]:
        """This part of a checkpoint's whole optimiser state and dead-latent counters."""
        shape, axes = model.feature_shape, optimizer_axes(model, optimizer)
        if self.heads is not None:  # every tensor of a crosscoder has its heads on axis 0
            optimizer_state = shard_optimizer_state(optimizer_state, [0] * len(axes), self.heads)
            whole_heads = (shape[0] * self.heads.size, *shape[1:])
            dead_state = {k: self.heads.local_slice(v.reshape(whole_heads)).reshape(-1) for k, v in dead_state.items()}
        if self.shards is not None:
            optimizer_state = shard_optimizer_state(optimizer_state, axes, self.shards)
            whole_shape, blocks = (*shape[:-1], shape[-1] * self.shards.size), model.feature_blocks()
            dead_state = {k: shard_features(v, whole_shape, self.shards, blocks) for k, v in dead_state.items()}
        return optimizer_state, dead_state

    def _grad_shards(self, model: SparseDictionary) -> GradShards | None:
        if not self._sharded:
            return None
        axes = model.feature_axes() if self.shards is not None else {}
        return GradShards([p for name, p in model.named_parameters() if name in axes],
                          self.shards.sum if self.shards is not None else None,
                          self.heads.sum if self.heads is not None else None)  # fmt: skip

    def _window_shards(self, model: SparseDictionary):
        if not self._sharded:
            return None
        return self._sum_over_parts, lambda values: self._whole_features(values, model)

    def _log_statistics(self, model: SparseDictionary) -> dict[str, float]:
        """The model's statistics; a part's are means over its features (and heads), so the whole's are their mean
        over the (equal) parts."""
        stats = model.log_statistics()
        if not self._sharded:
            return stats
        parts = (self.shards.size if self.shards else 1) * (self.heads.size if self.heads else 1)
        return mean_over_parts(stats, self._sum_over_parts, parts)

    def _warn_about_schedule_overlap(self, total_steps: int) -> None:
        cfg = self.cfg
        warmup = resolve_steps(cfg.lr_warm_up_steps, total_steps)
        cooldown = resolve_steps(cfg.lr_cool_down_steps, total_steps)
        if cfg.lr_scheduler_name == "constantwithwarmup" and warmup + cooldown > total_steps:
            logger.warning(
                "lr warm-up (%d) and cool-down (%d) overlap in a run of %d steps", warmup, cooldown, total_steps
            )

    def _autocast(self, model):
        if self.cfg.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(model.cfg.device).type, dtype=self.cfg.amp_dtype)

    def _coefficients_at(self, step: int, total_steps: int, model: SparseDictionary) -> LossCoefficients:
        """The loss of step `step`: the l1 weight warmed up and, for the TopK family, k annealed."""
        loss = self.cfg.loss
        l1_warmup = resolve_steps(loss.l1_coefficient_warmup_steps, total_steps)
        k = None
        if model.uses_k:
            k = model.cfg.top_k
            if loss.initial_k is not None:
                k = annealed_k(
                    step,
                    initial_k=loss.initial_k,
                    final_k=model.cfg.top_k,
                    warmup=resolve_steps(loss.k_warmup_steps, total_steps),
                    cold_boot=resolve_steps(loss.k_cold_booting_steps, total_steps),
                    schedule=loss.k_schedule_type,
                    exponential_factor=loss.k_exponential_factor,
                )
        return LossCoefficients(
            penalty=self.penalty,
            l1=loss.l1_coefficient * warmup_factor(step, l1_warmup),
            lp=loss.lp_coefficient,
            auxk=loss.auxk_coefficient,
            k_aux=loss.k_aux,
            k=k,
        )

    def _fold_on_save(self, model: SparseDictionary) -> bool:
        return self.cfg.fold_activation_scale and model.cfg.norm_activation == "dataset-wise"

    def _state(self, progress: _Progress, optimizer_state: dict, dead_state: dict, scheduler, wandb_run) -> dict:
        """The trainer state a checkpoint holds."""
        return {
            "progress": asdict(progress),
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "dead_latents": dead_state,
            "rng": capture_rng_states(),
            "trainer_config": self.cfg.model_dump(mode="json"),
            "wandb_run_id": getattr(wandb_run, "id", None),
        }

    def _save_sharded(self, model, progress: _Progress, optimizer, scheduler, dead, wandb_run, **options) -> Path:
        """A sharded checkpoint (every process at once): each writes its part of the tensors, nothing is gathered."""
        tensors, small = state_tensors(model, optimizer.state_dict(), dead.state_dict())
        split_of = dictionary_splits(model, optimizer, heads_split=self.heads is not None)
        state = self._state(progress, small, {}, scheduler, wandb_run)
        return save_sharded_checkpoint(self.cfg.exp_result_path, progress.step, self._whole_config(model), tensors,
                                       split_of, self.dp.mesh, state, **options)  # fmt: skip

    def _read_sharded(self, model, optimizer, small_optimizer_state: dict, path: Path) -> tuple[dict, dict]:
        """Load this process's part of a sharded checkpoint's weights into `model`; its optimiser and dead-latent
        states."""
        split_of = dictionary_splits(model, optimizer, heads_split=self.heads is not None)
        mesh = self.dp.mesh if self._sharded else None
        tensors = read_tensors(path / SHARDED_DIR, split_of, mesh, model.cfg.device)
        weights, optimizer_state, dead_state = loaded_states(tensors, small_optimizer_state)
        model.load_state_dict(weights)
        return optimizer_state, dead_state

    def _whole_config(self, model: SparseDictionary):
        """The config of the whole dictionary of this process's part (a collective under head parallelism: each head
        rank knows its heads' dataset norms)."""
        cfg = model.cfg
        if self.shards is not None:
            norms = cfg.dataset_average_activation_norm
            cfg = model.whole_cfg.model_copy(deep=True, update={"dataset_average_activation_norm": norms})
        return cfg if self.heads is None else whole_heads_config(cfg, self.heads, self.whole_heads)

    def _check_resumable(self, state: dict, path: Path) -> None:
        saved = TrainerConfig.model_validate(state["trainer_config"])
        changes = self.cfg.changes_against(saved)
        if changes:
            listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
            raise ConfigError(
                f"cannot resume from {path}: these trainer settings differ from the checkpoint's and would change "
                f"the run: {listed}. Restore them, or start a new run."
            )

    @staticmethod
    def checkpoint_wandb_run_id(path: str | Path) -> str | None:
        """The W&B run a checkpoint logged to; continue it with `WandbConfig(wandb_run_id=id, wandb_resume="must")`."""
        return load_trainer_state(path).get("wandb_run_id")


def _load_model_weights(model: SparseDictionary, path: Path) -> None:
    """Copy a checkpoint's weights (and dataset norms) into `model`, whose config must describe the same dictionary."""
    saved = load_sparse_dictionary(path, device=model.cfg.device, dtype=model.cfg.dtype)
    _take_config(model, saved.cfg, path)
    model.load_state_dict(saved.state_dict())


def _load_model_config(model: SparseDictionary, path: Path) -> None:
    """`_load_model_weights` without the weights (a sharded checkpoint's are read part by part)."""
    _take_config(model, read_dictionary_config(path / CONFIG_FILE, device=model.cfg.device), path)


def _take_config(model: SparseDictionary, saved, path: Path) -> None:
    """Check that a checkpoint's dictionary config `saved` describes `model`'s dictionary; take its dataset norms."""
    ignored = {"device", "dtype", "dataset_average_activation_norm"}
    ours, theirs = model.cfg.model_dump(exclude=ignored), saved.model_dump(exclude=ignored)
    differing = {k: (theirs[k], ours[k]) for k in ours if ours[k] != theirs.get(k)}
    if differing:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differing.items())
        raise ConfigError(f"cannot resume from {path}: the dictionary config differs from the checkpoint's: {listed}")
    if saved.dataset_average_activation_norm is not None:
        model.set_dataset_average_activation_norm(saved.dataset_average_activation_norm)


def _release(model: SparseDictionary) -> None:
    """Free the storage of `model`'s tensors (`_restore` gives them back, trained, when training ends)."""
    for tensor in model.state_dict(keep_vars=True).values():
        tensor.data = tensor.data.new_empty(0)


def _restore(model: SparseDictionary, state: dict[str, torch.Tensor]) -> None:
    """Give `model`'s released tensors the values of `state` (a whole state dict of the same dictionary)."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        tensor.data = state[name].to(tensor.device, tensor.dtype)


def _skip(batches: Iterator[Batch], n: int) -> Iterator[Batch]:
    """Drop the `n` batches a checkpointed run already trained on."""
    for index in range(n):
        if next(batches, None) is None:
            raise ValueError(
                f"the resumed stream ended after {index} batches, but the checkpoint had consumed {n}: the stream "
                "must yield the same batches as the original run"
            )
    return batches


def _log_console(step: int, total: int, metrics: dict[str, float]) -> None:
    """One compact line per prefix group (losses, metrics, sparsity, details)."""
    groups: dict[str, list[str]] = {}
    for key, value in metrics.items():
        prefix, _, name = key.partition("/")
        groups.setdefault(prefix, []).append(f"{name}={value:.4g}")
    logger.info("step %d/%d\n%s", step, total, "\n".join(f"  {p}: {' '.join(v)}" for p, v in groups.items()))
