"""The whole training loop against the bare optimiser step: what reading, shuffling, metrics and logging cost.

"Trainer loop" is `Trainer.fit` fed by the activation factory from a real SmolLM2 activation cache on disk: the
cached-activation reader, the shuffle buffer (32,768 rows), the step, the metric window reported every
`log_frequency` (10) steps, Aux-K on (quickstart settings), checkpoints off, the final weights saved. "Bare step" is
the same arithmetic on the same batches already in memory: `compute_loss` (with Aux-K on the dead latents), backward,
Adam, and the dead-latent counter Aux-K needs; nothing else. Both start from the same weights at the same constant
learning rate, so they take identical steps (the benchmark checks the final weights agree). Rounds interleave the two
contenders (each goes first in turn); rates are medians over rounds of whole runs, in tokens/s. Both keep the memory a
step frees for the next, as `Trainer.fit` does (`freed_memory_kept`); `--default-allocator` adds the bare step under
glibc's default settings, which fault the step's large tensors in afresh every step.

The CPU columns give the work done (CPU seconds of all the process's threads). On a machine shared with other work
they are the steadier measure: the scheduler shares the cores among threads, so a contender with one more runnable
thread (the prefetching reader) gets a larger share of a busy machine and its wall time flatters it. Run with
OMP_WAIT_POLICY=PASSIVE there, so that OpenMP threads waiting for a descheduled peer sleep instead of spinning (whose
cost otherwise depends on how many thread teams the process runs).

    python benchmarks/trainer_loop.py [--kinds sae crosscoder clt molt lorsa] [--steps 60] [--rounds 3] [--batch 4096]
        [--without-prefetch]
    python benchmarks/trainer_loop.py --kinds sae --profile      # where the loop's time goes (cProfile, by tottime)
    python benchmarks/trainer_loop.py --kinds synthetic --d-model 768 --d-sae 6144 --k 50 --device cuda

The SAE reads `.lm_saes/quickstart/activations` (`lm-saes quickstart` writes it); the crosscoder (residual stream of
layers 4-6) and the CLT (layers 3-6) read `.lm_saes/quality/circuits/activations`
(`configs/quality/circuits/generate.yaml`); MOLT (layer 3's MLP) and Lorsa (layer 3's attention, whole contexts)
read `.lm_saes/quality/lorsa_molt/activations` (`configs/quality/lorsa_molt/generate.yaml`). A kind whose cache is
missing is skipped, with the command to make it.
`synthetic` writes a cache of any width (`--d-model`) to a temporary directory with the project's writer first.
"""

import argparse
import contextlib
import cProfile
import io
import logging
import pstats
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lm_saes_core.activation.config import ActivationFactoryConfig
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.activation.reader import CachedActivations
from lm_saes_core.activation.writer import ActivationWriter, ActivationWriterConfig
from lm_saes_core.models import CLTConfig, CrossCoderConfig, LorsaConfig, MOLTConfig, SAEConfig, SparseDictionary
from lm_saes_core.models.config import SparseDictionaryConfig
from lm_saes_core.models.losses import LossConfig
from lm_saes_core.training.batches import count_tokens
from lm_saes_core.training.config import TrainerConfig
from lm_saes_core.training.memory import freed_memory_kept
from lm_saes_core.training.metrics import DeadLatentStatistics, FeatureActivity
from lm_saes_core.training.trainer import Trainer

QUICKSTART_CACHE = Path(".lm_saes/quickstart/activations")
CIRCUITS_CACHE = Path(".lm_saes/quality/circuits/activations")
LORSA_MOLT_CACHE = Path(".lm_saes/quality/lorsa_molt/activations")
LOSS = LossConfig(auxk_coefficient=1 / 32, k_aux=256, dead_threshold=200_000)  # configs/quickstart/train.yaml
SYNTHETIC_HOOK = "blocks.0.hook_resid_post"


@dataclass(frozen=True)
class Kind:
    label: str
    cache: Path
    make_cache: str
    config: Callable[[str], SparseDictionaryConfig]  # device -> config
    context: int = 0
    """Positions per context for a kind that reads whole contexts (Lorsa; batches of batch / context contexts);
    0: token rows."""

    def hooks(self) -> list[str]:
        return self.config("cpu").hook_points


def sae_config(device: str) -> SAEConfig:
    hook = "blocks.6.hook_resid_post"
    return SAEConfig(d_model=576, d_sae=4608, hook_point_in=hook, hook_point_out=hook, act_fn="topk", top_k=32,
                     norm_activation="dataset-wise", device=device)  # fmt: skip


def crosscoder_config(device: str) -> CrossCoderConfig:
    heads = [f"blocks.{layer}.hook_resid_post" for layer in (4, 5, 6)]
    return CrossCoderConfig(d_model=576, d_sae=4608, heads=heads, act_fn="topk", top_k=32,
                            norm_activation="dataset-wise", device=device)  # fmt: skip


def clt_config(device: str) -> CLTConfig:
    ins = [f"blocks.{layer}.ln2.hook_normalized" for layer in (3, 4, 5, 6)]
    outs = [f"blocks.{layer}.hook_mlp_out" for layer in (3, 4, 5, 6)]
    return CLTConfig(d_model=576, d_sae=2304, hook_points_in=ins, hook_points_out=outs, act_fn="topk", top_k=16,
                     norm_activation="dataset-wise", device=device)  # fmt: skip


def molt_config(device: str) -> MOLTConfig:
    """configs/quality/lorsa_molt/sweep.yaml's MOLT: 1740 transforms of ranks 1-8 (the parameters of a 576 x 4608
    transcoder)."""
    return MOLTConfig(d_model=576, rank_counts={1: 928, 2: 464, 4: 232, 8: 116}, act_fn="topk", top_k=32,
                      hook_point_in="blocks.3.ln2.hook_normalized", hook_point_out="blocks.3.hook_mlp_out",
                      norm_activation="dataset-wise", device=device)  # fmt: skip


def lorsa_config(device: str) -> LorsaConfig:
    """configs/quality/lorsa_molt/lorsa.yaml's Lorsa: 4608 rank-1 OV heads on 18 QK heads, TopK k 32."""
    return LorsaConfig(d_model=576, d_sae=4608, n_ctx=128, hook_point_in="blocks.3.ln1.hook_normalized",
                       hook_point_out="blocks.3.hook_attn_out", act_fn="topk", top_k=32, n_qk_heads=18, d_qk_head=64,
                       attn_scale=8.0, rotary_base=100000.0, rotary_adjacent_pairs=False,
                       norm_activation="dataset-wise", device=device)  # fmt: skip


MAKE_CIRCUITS = "lm-saes generate configs/quality/circuits/generate.yaml"
MAKE_LORSA_MOLT = "lm-saes generate configs/quality/lorsa_molt/generate.yaml"
KINDS = {
    "sae": Kind("SAE 576 x 4608, TopK k 32", QUICKSTART_CACHE, "lm-saes quickstart", sae_config),
    "crosscoder": Kind(
        "crosscoder, 3 heads (resid 4-6) x 4608, TopK k 32", CIRCUITS_CACHE, MAKE_CIRCUITS, crosscoder_config
    ),  # fmt: skip
    "clt": Kind("CLT, 4 layers (3-6) x 2304, TopK k 16 per layer", CIRCUITS_CACHE, MAKE_CIRCUITS, clt_config),
    "molt": Kind(
        "MOLT, layer 3 MLP, 1740 transforms (ranks 1-8), TopK k 32", LORSA_MOLT_CACHE, MAKE_LORSA_MOLT, molt_config
    ),  # fmt: skip
    "lorsa": Kind(
        "Lorsa, layer 3 attention, 4608 OV / 18 QK heads, TopK k 32 (contexts of 128)",
        LORSA_MOLT_CACHE,
        MAKE_LORSA_MOLT,
        lorsa_config,
        context=128,
    ),  # fmt: skip
}


def synthetic_kind(d_model: int, d_sae: int, k: int, n_tokens: int, directory: Path) -> Kind:
    """An SAE of any size on a cache written here with the project's writer: 2-D contexts of 128 positions (the
    first masked, as BOS is), each token a random mix of 64 fixed directions plus noise (cheap to make)."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(64, d_model, generator=generator)

    def items() -> Iterator[dict[str, torch.Tensor]]:
        rows, context = 64, 128
        for index in range(-(-n_tokens // (rows * context))):
            mix = torch.randn(rows * context, len(directions), generator=generator).relu_()
            activation = mix @ directions + 0.5 * torch.randn(rows * context, d_model, generator=generator)
            mask = torch.ones(rows, context, dtype=torch.bool)
            mask[:, 0] = False
            yield {SYNTHETIC_HOOK: activation.reshape(rows, context, d_model),
                   "tokens": torch.randint(3, 50000, (rows, context), generator=generator), "mask": mask,
                   "attention_mask": torch.ones(rows, context, dtype=torch.bool),
                   "doc_index": torch.full((rows, context), index),
                   "doc_position": torch.arange(context).repeat(rows, 1),
                   "source_idx": torch.zeros(rows, context, dtype=torch.long)}  # fmt: skip

    writer = ActivationWriterConfig(hook_points=[SYNTHETIC_HOOK], cache_dir=str(directory), num_workers=2)
    ActivationWriter(writer, provenance={"dataset_name": "synthetic"}).write(items())

    def config(device: str) -> SAEConfig:
        return SAEConfig(d_model=d_model, d_sae=d_sae, hook_point_in=SYNTHETIC_HOOK, hook_point_out=SYNTHETIC_HOOK,
                         act_fn="topk", top_k=k, norm_activation="dataset-wise", device=device)  # fmt: skip

    return Kind(f"SAE {d_model} x {d_sae}, TopK k {k} (synthetic cache)", directory, "", config)


def factory_config(kind: Kind, batch: int, device: str) -> ActivationFactoryConfig:
    """As configs/quickstart/train.yaml reads its cache: chunks shuffled, 1-D tokens, a 32,768-row shuffle buffer;
    the chunks go to the training device as they are read, so flattening and shuffling run there."""
    source = {"type": "activations", "name": "cache", "path": str(kind.cache), "shuffle_chunks": True, "device": device}
    if kind.context:  # whole contexts: batch and buffer count contexts
        return ActivationFactoryConfig(sources=[source], target="activations-2d", hook_points=kind.hooks(),
                                       batch_size=batch // kind.context, buffer_size=256,
                                       buffer_shuffle={"perm_seed": 0})  # fmt: skip
    return ActivationFactoryConfig(sources=[source], target="activations-1d", hook_points=kind.hooks(),
                                   batch_size=batch, buffer_size=32768, buffer_shuffle={"perm_seed": 0})  # fmt: skip


def stream(kind: Kind, batch: int, device: str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    return ActivationFactory(factory_config(kind, batch, device)).process()


def dataset_norms(kind: Kind) -> dict[str, float]:
    """Mean token norm of every hook over the cache's first chunk (what the initializer would set)."""
    item = next(CachedActivations(kind.cache, hook_points=kind.hooks()).iterate(num_workers=0))
    return {hook: float(item[hook][item["mask"]].float().norm(dim=-1).mean()) for hook in kind.hooks()}


def new_model(kind: Kind, norms: dict[str, float], device: str) -> SparseDictionary:
    torch.manual_seed(0)
    model = SparseDictionary.from_config(kind.config(device))
    model.set_dataset_average_activation_norm(norms)
    return model


def process_cpu_seconds() -> float:
    """CPU time of every thread of this process: the work done, whatever else the machine runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def trainer_config(steps: int, batch: int, out: str) -> TrainerConfig:
    return TrainerConfig(loss=LOSS, lr=1e-3, lr_scheduler_name="constant", total_training_tokens=steps * batch,
                         log_frequency=10, n_checkpoints=0, exp_result_path=out)  # fmt: skip


def run_trainer(
    kind: Kind, norms: dict[str, float], steps: int, batch: int, device: str, prefetch: int = 2, first: int = 0
) -> tuple[float, SparseDictionary]:
    """Seconds of one `Trainer.fit` over `steps` batches read from the cache (model built beforehand). `first`: the
    valid tokens of the first batch, which size a run of whole contexts (default: `batch`)."""
    model = new_model(kind, norms, device)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(trainer_config(steps, first or batch, out), prefetch=prefetch)
        synchronize(device)
        started = time.perf_counter()
        result = trainer.fit(model, stream(kind, batch, device), progress_bar=("trainer loop", 0))
        synchronize(device)
        elapsed = time.perf_counter() - started
    assert result.steps == steps, result
    return elapsed, model


def run_bare(
    kind: Kind, norms: dict[str, float], batches: list[dict[str, torch.Tensor]], device: str, kept: bool = True
) -> tuple[float, SparseDictionary]:
    """Seconds of the bare steps over batches already on the device (model built beforehand). `kept`: freed memory
    kept for the next step, as `Trainer.fit` keeps it (`freed_memory_kept`); False: glibc's default settings."""
    model = new_model(kind, norms, device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    coefficients = LOSS.coefficients(model.cfg.top_k if model.uses_k else None)
    dead = DeadLatentStatistics(model.n_features, LOSS.dead_threshold, device)
    synchronize(device)
    started = time.perf_counter()
    with freed_memory_kept() if kept else contextlib.nullcontext():
        for batch in batches:
            out = model.compute_loss(batch, coefficients, dead.is_dead)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dead.update(FeatureActivity.of(model, out.feature_acts), out.n_tokens)
        synchronize(device)
        return time.perf_counter() - started, model


def same_weights(a: SparseDictionary, b: SparseDictionary) -> float:
    """The largest relative difference between two models' parameters (0 when they took identical steps)."""
    worst = 0.0
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        scale = float(p.detach().abs().max().clamp(min=1e-12))
        worst = max(worst, float((p.detach() - q.detach()).abs().max()) / scale)
        assert p.shape == q.shape, name
    return worst


def profile(kind: Kind, norms: dict[str, float], steps: int, batch: int, device: str) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run_trainer(kind, norms, steps, batch, device)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue())


def compare(kind: Kind, args: argparse.Namespace, console: Console) -> None:
    norms = dataset_norms(kind)
    if args.profile:
        profile(kind, norms, args.steps, args.batch, args.device)
        return
    batches = [b for b, _ in zip(stream(kind, args.batch, args.device), range(args.steps), strict=False)]
    assert len(batches) == args.steps, f"the cache holds only {len(batches)} batches of {args.batch}"
    batches = [{key: value.to(args.device) for key, value in batch.items()} for batch in batches]
    first = count_tokens(batches[0])
    contenders: dict[str, Callable[[], tuple[float, SparseDictionary]]] = {
        "bare": lambda: run_bare(kind, norms, batches, args.device),
        "trainer": lambda: run_trainer(kind, norms, args.steps, args.batch, args.device, first=first),
    }
    labels = {"bare": "bare step, batches in memory", "trainer": "Trainer.fit from the cache"}
    if args.without_prefetch:
        contenders["plain"] = lambda: run_trainer(kind, norms, args.steps, args.batch, args.device, 0, first)
        labels["plain"] = "Trainer.fit, prefetch=0"
    if args.default_allocator:
        contenders["faulting"] = lambda: run_bare(kind, norms, batches, args.device, kept=False)
        labels["faulting"] = "bare step, glibc's default malloc settings"
    run_bare(kind, norms, batches[:2], args.device)  # warm-up
    run_trainer(kind, norms, 2, args.batch, args.device, first=first)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    drift = 0.0
    for round_ in range(args.rounds):
        names = list(contenders)
        order = names[round_ % len(names) :] + names[: round_ % len(names)]  # each goes first in turn
        models = {}
        for name in order:
            cpu_before = process_cpu_seconds()
            elapsed, models[name] = contenders[name]()
            cpu[name].append(process_cpu_seconds() - cpu_before)
            seconds[name].append(elapsed)
        drift = max(drift, same_weights(models["bare"], models["trainer"]))
    tokens = sum(count_tokens(batch) for batch in batches)  # the valid ones (whole contexts hold masked BOS)
    rates = {name: tokens / statistics.median(values) for name, values in seconds.items()}
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    table = Table(
        title=f"Training loop vs bare step: {kind.label}, batch {args.batch}, fp32, {where}; Aux-K (k_aux "
        f"{LOSS.k_aux}, dead after {LOSS.dead_threshold:,} tokens), metrics every 10 steps; {kind.cache}; median of "
        f"{args.rounds} interleaved rounds x {args.steps} steps; final weights agree to {drift:.1e} (relative)"
    )
    columns = ("contender", "tokens/s", "s per run (each round)", "vs bare step", "CPU s per run", "CPU work vs bare")
    for column in columns:
        table.add_column(column, justify="left" if column == "contender" else "right")
    work = {name: statistics.median(values) for name, values in cpu.items()}
    for name in contenders:
        runs = " ".join(f"{value:.2f}" for value in seconds[name])
        table.add_row(labels[name], f"{rates[name]:,.0f}", runs, f"{rates[name] / rates['bare']:.3f}",
                      f"{work[name]:.1f}", f"{work[name] / work['bare']:.3f}")  # fmt: skip
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kinds", nargs="+", choices=[*sorted(KINDS), "synthetic"], default=["sae", "crosscoder", "clt"]
    )
    parser.add_argument("--steps", type=int, default=60, help="steps per run (one epoch of the caches is ~61)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=768, help="synthetic kind: width of the activations")
    parser.add_argument("--d-sae", type=int, default=6144, help="synthetic kind")
    parser.add_argument("--k", type=int, default=50, help="synthetic kind")
    parser.add_argument("--without-prefetch", action="store_true", help="add a row for Trainer(prefetch=0)")
    parser.add_argument(
        "--default-allocator", action="store_true", help="add a row for the bare step under glibc's default settings"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one trainer run per kind, then exit")
    args = parser.parse_args()
    logging.getLogger("lm_saes_core").setLevel(logging.WARNING)
    console = Console(width=140)
    for name in args.kinds:
        if name == "synthetic":
            with tempfile.TemporaryDirectory() as directory:
                n_tokens = (args.steps + 1) * args.batch * 130 // 127  # the masked BOS positions do not train
                kind = synthetic_kind(args.d_model, args.d_sae, args.k, n_tokens, Path(directory) / "activations")
                compare(kind, args, console)
            continue
        kind = KINDS[name]
        if not (kind.cache / "manifest.json").exists():
            console.print(f"skipping {name}: no cache at {kind.cache} (make it with `{kind.make_cache}`)")
            continue
        compare(kind, args, console)


if __name__ == "__main__":
    main()
