"""Feature-analysis throughput against the bare cost of encoding the same activations.

A 4,608-feature TopK SAE (d_model 576, k 32: the quickstart SAE when it exists, else random weights) analysed over
cached 2-D SmolLM2 layer-6 activations (the quickstart cache when it exists, else Gaussian stand-ins with the same
shapes). All contenders see the same in-memory batches in one run: "encode only" is the SAE's encode of every batch
(what any analysis must pay); the analysis (default pools: 10 top, 3 bands x 5, 10 non-activating; a 60-bin
histogram) is timed per batch alone and whole, i.e. with the one-off conversion of the pools into records. Rates
are valid (masked-in) tokens per second, medians of `--repeats` runs.

    python benchmarks/analysis.py [--contexts 512] [--batch 32] [--repeats 3] [--device cpu] [--threads N]

On a CPU shared with other work, prefer `--threads 1`: with more threads than free cores every parallel region
waits for a descheduled thread, which punishes the analysis's many small tensor operations far more than the one
large matrix product of the encoder.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lm_saes_core.analysis import FeatureAnalyzer, FeatureAnalyzerConfig
from lm_saes_core.analysis.feature_analyzer import ContextBatch, FeatureAnalysisState, encode_contexts
from lm_saes_core.models import SAEConfig, SparseAutoEncoder

D_MODEL, D_SAE, K, CONTEXT = 576, 4608, 32, 128
HOOK = "blocks.6.hook_resid_post"
QUICKSTART = Path(".lm_saes/quickstart")


def load_sae(device: str) -> tuple[SparseAutoEncoder, str]:
    if (QUICKSTART / "sae" / "config.json").exists():
        sae = SparseAutoEncoder.from_pretrained(QUICKSTART / "sae", device=device, fold_activation_scale=True)
        if sae.cfg.d_sae == D_SAE:
            return sae.eval(), "quickstart TopK SAE"
    cfg = SAEConfig(
        d_model=D_MODEL,
        d_sae=D_SAE,
        hook_point_in=HOOK,
        hook_point_out=HOOK,
        act_fn="topk",
        top_k=K,
        norm_activation="inference",
        device=device,
    )
    torch.manual_seed(0)
    return SparseAutoEncoder.from_config(cfg).eval(), "random TopK SAE"


def load_batches(n_contexts: int, batch: int, device: str) -> tuple[list[dict[str, torch.Tensor]], str]:
    """2-D items of `batch` contexts: the activations plus tokens and masks, as the activation factory yields them."""
    rows: list[dict[str, torch.Tensor]] = []
    if (QUICKSTART / "activations" / "manifest.json").exists():
        from lm_saes_core.activation.reader import CachedActivations

        source = "SmolLM2 layer 6 (quickstart cache)"
        for item in CachedActivations(QUICKSTART / "activations").iterate(num_workers=0):
            rows.append(item)
            if sum(len(r["tokens"]) for r in rows) >= n_contexts:
                break
        merged = {key: torch.cat([r[key] for r in rows])[:n_contexts] for key in rows[0]}
    else:
        source = "Gaussian stand-ins (no quickstart cache)"
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(CONTEXT // 2, CONTEXT + 1, (n_contexts,), generator=generator)
        positions = torch.arange(CONTEXT)
        attention = positions[None] < lengths[:, None]
        merged = {
            HOOK: torch.randn(n_contexts, CONTEXT, D_MODEL, generator=generator) * 4,
            "tokens": torch.randint(3, 49152, (n_contexts, CONTEXT), generator=generator),
            "attention_mask": attention,
            "mask": attention & (positions[None] > 0),
            "doc_index": torch.arange(n_contexts)[:, None].expand(-1, CONTEXT),
            "doc_position": torch.where(attention & (positions[None] > 0), positions[None] - 1, -1),
            "source_idx": torch.zeros(n_contexts, CONTEXT, dtype=torch.int64),
        }
    merged = {key: value.to(device) for key, value in merged.items()}
    batches = [{key: value[i : i + batch] for key, value in merged.items()} for i in range(0, n_contexts, batch)]
    return batches, source


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_encode(sae: SparseAutoEncoder, batches: list[dict[str, torch.Tensor]], device: str) -> float:
    with torch.no_grad():
        synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            x, _, _, _ = sae.prepare({HOOK: batch[HOOK]})
            sae.encode(x)
        synchronize(device)
    return time.perf_counter() - started


def time_analysis(sae: SparseAutoEncoder, batches: list[dict[str, torch.Tensor]], n_tokens: int, device: str) -> float:
    analyzer = FeatureAnalyzer(FeatureAnalyzerConfig(total_analyzing_tokens=n_tokens))
    synchronize(device)
    started = time.perf_counter()
    analyses = analyzer.analyze(sae, batches, source_names=["python-docs"], progress=False)
    synchronize(device)
    elapsed = time.perf_counter() - started
    assert analyses[0].n_analyzed_tokens == n_tokens
    return elapsed


def time_streaming(sae: SparseAutoEncoder, batches: list[dict[str, torch.Tensor]], device: str) -> float:
    """The per-batch part of the analysis alone (encode, statistics, pool merges), without turning the pools into
    records at the end (a fixed cost per analysis, whatever its length)."""
    state = None
    with torch.no_grad():
        synchronize(device)
        started = time.perf_counter()
        for item in batches:
            batch = ContextBatch.from_item(item)
            feature_acts = encode_contexts(sae, item)
            if state is None:
                state = FeatureAnalysisState(
                    FeatureAnalyzerConfig(total_analyzing_tokens=1), sae.cfg.d_sae, CONTEXT, feature_acts.device
                )
            state.update(feature_acts, batch)
        synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="contexts per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sae, sae_source = load_sae(args.device)
    batches, source = load_batches(args.contexts, args.batch, args.device)
    n_tokens = int(sum(batch["mask"].sum() for batch in batches))

    time_encode(sae, batches[:2], args.device)  # warm-up
    time_analysis(sae, batches[:2], int(sum(b["mask"].sum() for b in batches[:2])), args.device)
    rates: dict[str, list[float]] = {"encode": [], "streaming": [], "analysis": []}
    for _ in range(args.repeats):  # interleaved, so all see the same machine load
        rates["encode"].append(n_tokens / time_encode(sae, batches, args.device))
        rates["streaming"].append(n_tokens / time_streaming(sae, batches, args.device))
        rates["analysis"].append(n_tokens / time_analysis(sae, batches, n_tokens, args.device))
    medians = {name: statistics.median(values) for name, values in rates.items()}

    cpu = f"CPU, {torch.get_num_threads()} threads"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    table = Table(
        title=f"Feature analysis, d_model {D_MODEL}, d_sae {sae.cfg.d_sae}, {sae_source}; {source}; {args.contexts} "
        f"contexts x {CONTEXT} ({n_tokens:,} valid tokens), batches of {args.batch}; {device}; median of "
        f"{args.repeats}"
    )
    for column in ("contender", "tokens/s", "vs encode only"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for name, label in (
        ("encode", "SAE encode only"),
        ("streaming", "FeatureAnalyzer, per-batch part (encode, statistics, pools)"),
        ("analysis", "FeatureAnalyzer.analyze, whole (+ pools to records once)"),
    ):
        table.add_row(label, f"{medians[name]:,.0f}", f"{medians[name] / medians['encode']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
