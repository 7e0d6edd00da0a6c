"""Throughput of `generate_activations` (to disk) against the bare transformers forward truncated at the same layer.

Both sides process the same token windows (bundled corpus, same context size and batch size), on the same
threads, in one run; each is repeated and the median is reported. The bare forward is the floor of what any
activation generator can cost: `LlamaModel` with only the first L+1 decoder layers, no hooks, nothing kept.

    python benchmarks/activation_generation.py [--tokens 32768] [--repeats 3] [--backend huggingface]
"""

import argparse
import statistics
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from lm_saes_core import DatasetConfig, GenerateActivationsSettings, LanguageModelConfig, generate_activations
from lm_saes_core.activation.windows import iter_window_batches
from lm_saes_core.backend import load_model
from lm_saes_core.data import load_dataset

HOOK = "blocks.6.hook_resid_post"
LAYER = 6


def bare_forward_seconds(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Time the HF decoder truncated to layers 0..LAYER over the batches (no hooks, outputs dropped)."""
    hf = model.model  # the AutoModelForCausalLM held by the HuggingFace backend
    decoder = hf.model
    all_layers = decoder.layers
    decoder.layers = all_layers[: LAYER + 1]
    try:
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                decoder(input_ids=batch["tokens"], attention_mask=batch["attention_mask"].long(), use_cache=False)
        return time.perf_counter() - started
    finally:
        decoder.layers = all_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["huggingface", "transformer_lens"],
        choices=["huggingface", "transformer_lens"],
    )
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    model_cfg = LanguageModelConfig(model_name="smollm2-135m", backend="huggingface")
    dataset_cfg = DatasetConfig(dataset_name_or_path="python-docs")
    model = load_model(model_cfg)
    dataset = load_dataset(dataset_cfg)
    n_windows = args.tokens // args.context
    texts = ((i, row["text"]) for i, row in enumerate(dataset))
    batches = []
    for batch in iter_window_batches(
        texts,
        model.tokenizer,
        batch_rows=args.batch,
        context_size=args.context,
        bos_token_id=model.bos_token_id,
        pad_token_id=model.pad_token_id,
    ):
        batches.append(batch)
        if sum(len(b["tokens"]) for b in batches) >= n_windows:
            break
    positions = sum(b["tokens"].numel() for b in batches)

    bare_forward_seconds(model, batches[:1])  # warm-up
    bare = [positions / bare_forward_seconds(model, batches) for _ in range(args.repeats)]

    ours: dict[str, list[float]] = {backend: [] for backend in args.backends}
    for _ in range(args.repeats):  # backends alternate so drifting machine load hits both alike
        for backend in args.backends:
            with tempfile.TemporaryDirectory() as out:
                settings = GenerateActivationsSettings(
                    model=model_cfg.model_copy(update={"backend": backend}),
                    dataset=dataset_cfg,
                    hook_points=[HOOK],
                    output_dir=out,
                    context_size=args.context,
                    model_batch_size=args.batch,
                    batch_size=args.batch,
                    total_tokens=positions,
                    num_workers=2,
                )
                ours[backend].append(generate_activations(settings).tokens_per_second)

    table = Table(
        title=f"activation generation to {HOOK}, {positions} positions, context {args.context}, "
        f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    table.add_column("what")
    table.add_column("tokens/s", justify="right")
    table.add_column("runs", justify="right")
    table.add_column("ratio", justify="right")
    bare_median = statistics.median(bare)
    table.add_row(
        "bare transformers forward, layers 0-6", f"{bare_median:,.0f}", " ".join(f"{x:.0f}" for x in bare), "1.00"
    )
    for backend, runs in ours.items():
        median = statistics.median(runs)
        table.add_row(
            f"generate_activations ({backend}) to disk",
            f"{median:,.0f}",
            " ".join(f"{x:.0f}" for x in runs),
            f"{median / bare_median:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
