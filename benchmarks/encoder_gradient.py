"""The TopK encoder's weight gradient, three ways, on one device: which one the sparse kernels should use there.

grad_W_E (D, d_sae) = x^T @ G where G (N, d_sae) holds grad_values at the selected (row, feature) pairs only.
  dense:      scatter G into (N, d_sae), one dense matmul
  sparse-mm:  G as a sparse COO (d_sae, N) matrix times x (what kernels.GatherPreacts uses)
  index-add:  outer products grad_values[n, j] * x[n] added into row indices[n, j] of a (d_sae, D) buffer

    python benchmarks/encoder_gradient.py [--device cuda] [--d-model 2048] [--d-sae 65536] [--k 64] [--batch 4096]
"""

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table


def dense(x, indices, grad_values, d_sae):
    g = torch.zeros(x.shape[0], d_sae, device=x.device, dtype=x.dtype).scatter_(1, indices, grad_values)
    return x.t() @ g


def sparse_mm(x, indices, grad_values, d_sae):
    n, k = indices.shape
    rows = torch.arange(n, device=x.device).repeat_interleave(k)
    g = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), rows]), grad_values.reshape(-1), (d_sae, n), check_invariants=False
    )
    return torch.sparse.mm(g, x).t()


def index_add(x, indices, grad_values, d_sae):
    contributions = (grad_values.unsqueeze(-1) * x.unsqueeze(1)).reshape(-1, x.shape[1])
    return (
        torch.zeros(d_sae, x.shape[1], device=x.device, dtype=x.dtype)
        .index_add_(0, indices.reshape(-1), contributions)
        .t()
    )


def timed(fn, args, device, repeats=10):
    fn(*args)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_model, device=args.device)
    indices = torch.rand(args.batch, args.d_sae, device=args.device).topk(args.k, dim=-1).indices
    grad_values = torch.randn(args.batch, args.k, device=args.device)
    reference = dense(x, indices, grad_values, args.d_sae)
    table = Table(
        title=f"encoder weight gradient, N {args.batch}, D {args.d_model}, d_sae {args.d_sae}, k {args.k}, "
        f"{args.device}, median of 10"
    )
    for column in ("method", "ms", "vs dense", "max abs error"):
        table.add_column(column, justify="left" if column == "method" else "right")
    methods = {"dense": dense, "sparse-mm": sparse_mm, "index-add": index_add}
    seconds = {name: timed(fn, (x, indices, grad_values, args.d_sae), args.device) for name, fn in methods.items()}
    for name, fn in methods.items():
        error = (fn(x, indices, grad_values, args.d_sae) - reference).abs().max().item()
        table.add_row(name, f"{seconds[name] * 1e3:.2f}", f"{seconds['dense'] / seconds[name]:.2f}", f"{error:.1e}")
    Console().print(table)


if __name__ == "__main__":
    main()
