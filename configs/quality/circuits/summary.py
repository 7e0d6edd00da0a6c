"""The circuits quality study's table: every evaluated dictionary side by side (held-out EV per output hook, L0,
spliced CE loss recovered all at once and each hook alone). Usage: summary.py EVAL_DIR (the JSONs of run.sh)."""

import json
import sys
from pathlib import Path


def per_group(metrics: dict, metric: str) -> list[float]:
    """A CLT's `metrics/<metric>_L<l>` or a crosscoder's `crosscoder_metrics/<head>/<metric>`, in order."""
    clt = [metrics[key] for key in sorted(k for k in metrics if k.startswith(f"metrics/{metric}_L"))]
    crosscoder = [v for k, v in metrics.items() if k.startswith("crosscoder_metrics/") and k.endswith(f"/{metric}")]
    return clt or crosscoder


def main(directory: str) -> None:
    rows = []
    for path in sorted(Path(directory).glob("*.json")):
        m = json.loads(path.read_text())["metrics"]
        ev = per_group(m, "explained_variance") or [m["metrics/explained_variance"]]
        alone = per_group(m, "ce_loss_recovered_alone")
        rows.append(
            (
                path.stem,
                " ".join(f"{v:.3f}" for v in ev),
                m["metrics/l0"],
                m.get("metrics/ce_loss_recovered"),
                " ".join(f"{v:.3f}" for v in alone),
                m["metrics/dead_fraction"],
            )
        )
    print(f"{'dictionary':24} {'EV per output hook':30} {'L0':>7} {'CE rec.':>8} {'CE rec. alone':28} {'dead':>6}")
    for name, ev, l0, ce, alone, dead in rows:
        ce_text = f"{ce:.3f}" if ce is not None else "-"
        print(f"{name:24} {ev:30} {l0:7.1f} {ce_text:>8} {alone or '-':28} {dead:6.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
