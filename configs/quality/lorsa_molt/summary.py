"""The Lorsa/MOLT quality study's table: each dictionary beside the one it is compared with (Lorsa vs a TopK SAE of the
same width and k on layer 3's attention output; MOLT vs a TopK transcoder of about the same parameter count on layer 3's
MLP), with held-out EV and L0, the last training window's EV, dead features and parameter counts.
Usage: summary.py EVAL_DIR (the JSONs of run.sh; each names its dictionary's directory)."""

import json
import math
import struct
import sys
from pathlib import Path

ORDER = ["lorsa", "sae-attn", "molt-mlp", "tc-mlp"]


def parameter_count(directory: Path) -> int:
    """Every tensor saved in the dictionary's safetensors file (encoder, decoder, biases; for a Lorsa also Q/K/V)."""
    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def main(directory: str) -> None:
    records = {}
    for path in Path(directory).glob("*.json"):
        record = json.loads(path.read_text())
        records[path.stem] = record
    names = [n for n in ORDER if n in records] + sorted(n for n in records if n not in ORDER)
    print(
        f"{'dictionary':10} {'kind':6} {'output hook':22} {'features':>8} {'params':>10} {'L0':>6} {'EV':>6} "
        f"{'EV train':>8} {'dead':>6}"
    )
    for name in names:
        record, m = records[name], records[name]["metrics"]
        sae_dir = Path(record["sae_path"])
        cfg = json.loads((sae_dir / "config.json").read_text())
        trained = json.loads((sae_dir / "train_result.json").read_text())
        train_ev = trained["last_metrics"]["metrics/explained_variance"]
        kind = {"sae": "tc" if cfg["hook_point_in"] != cfg["hook_point_out"] else "sae"}.get(
            cfg["sae_type"], cfg["sae_type"]
        )
        print(
            f"{name:10} {kind:6} {cfg['hook_point_out']:22} {cfg['d_sae']:8d} {parameter_count(sae_dir):10,d} "
            f"{m['metrics/l0']:6.1f} {m['metrics/explained_variance']:6.3f} {train_ev:8.3f} "
            f"{m['metrics/dead_fraction']:6.3f}"
        )
        ranks = sorted(
            (int(k.removeprefix("molt_metrics/l0_rank")), v)
            for k, v in m.items()
            if k.startswith("molt_metrics/l0_rank") and not k.endswith("_ratio")
        )
        if ranks:
            per_rank = ", ".join(f"rank {r}: {v:.1f}" for r, v in ranks)
            print(
                f"{'':10} active transforms per token by rank: {per_rank}; summed rank "
                f"{m['molt_metrics/total_rank_sum']:.1f}"
            )
    tokens = {record["metrics"]["details/n_tokens"] for record in records.values()}
    print(f"held-out tokens: {', '.join(f'{t:.0f}' for t in sorted(tokens))}")


if __name__ == "__main__":
    main(sys.argv[1])
