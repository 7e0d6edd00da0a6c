"""Time to first byte of the feature browser (`lm-saes serve`) on a 65k-feature SQLite store.

The store is built from synthetic records through the store's own write API: a 65,536-feature SAE of the bundled
SmolLM2 (so pages decode real token ids with its tokenizer), every feature with an analysis (log-normal firing
counts, a 60-bin histogram, 10 top contexts, 5 from a band and 5 non-activating ones of `--context` tokens) and DLA
tokens, and `--interpreted` of them with an explanation and two scores. A real `lm-saes serve` process answers over
loopback HTTP; time to first byte is measured from sending the request to the status line arriving.

- cold: the first request of a freshly started server (templates compiled, tokenizer loaded on that request; the
  OS page cache is left as it is), median over `--restarts` server starts;
- warm: later requests to other features / other pages of the table, median of `--warm`.

Baselines, measured in the same run: the bare store call behind each page, in-process (`get_feature` for a feature
page; `feature_page` and `feature_frequencies` for a table page).

    python benchmarks/browser.py [--features 65536] [--context 64] [--interpreted 0.1] [--store PATH] [--keep]
"""

import argparse
import http.client
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from lm_saes_core.backend import LanguageModelConfig
from lm_saes_core.models import SAEConfig
from lm_saes_core.store import (
    DictionaryRecord,
    FeatureAnalysis,
    FeatureLogits,
    FeatureSamples,
    Interpretation,
    InterpretationScore,
    LogitToken,
)
from lm_saes_core.store.sqlite import SQLiteRecordStore

NAME, SERIES, MODEL = "bench-65k", "bench", "smollm2-135m"
HOOK = "blocks.6.hook_resid_post"
VOCAB = 49152
N_TOKENS = 1_000_000
WRITE_CHUNK = 2048
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the store


def synthetic_analysis(rng: np.random.Generator, context: int, pools: dict[str, int]) -> FeatureAnalysis:
    act_times = int(min(N_TOKENS, rng.lognormal(mean=6.0, sigma=2.5))) if rng.random() > 0.05 else 0
    max_act = float(rng.lognormal(1.0, 0.7)) if act_times else 0.0
    edges = np.geomspace(1e-3, 1e3, 61).astype(np.float32)
    counts = np.zeros(60, np.int64)
    if act_times:
        counts[rng.integers(25, 40, size=min(act_times, 200))] += 1
    samples = []
    for name, n in pools.items():
        rows = n if act_times or name == "non_activating" else 0
        activations = np.zeros((rows, context), np.float32)
        if name != "non_activating" and rows:
            activations = np.where(rng.random((rows, context)) < 0.1, rng.random((rows, context)) * max_act, 0.0)
            activations[:, context // 2] = max_act * np.linspace(1.0, 0.5, rows)
        samples.append(
            FeatureSamples(
                name=name,
                tokens=rng.integers(0, VOCAB, size=(rows, context), dtype=np.int32),
                activations=activations.astype(np.float32),
                lengths=np.full(rows, context, np.int32),
                doc_index=rng.integers(0, 100_000, rows),
                doc_position=rng.integers(0, 4096, rows),
                dataset=["bench-docs"] * rows,
            )
        )
    return FeatureAnalysis(
        name="default",
        act_times=act_times,
        n_analyzed_tokens=N_TOKENS,
        max_feature_acts=max_act,
        mean_feature_acts=max_act / 2,
        histogram_edges=edges,
        histogram_counts=counts,
        samples=samples,
    )


def synthetic_logits(rng: np.random.Generator) -> FeatureLogits:
    def tokens(sign: float) -> list[LogitToken]:
        ids, values = rng.integers(0, VOCAB, 10), np.sort(rng.random(10))[::-1]
        return [LogitToken(int(i), f"tok{i}", sign * float(v)) for i, v in zip(ids, values, strict=True)]

    return FeatureLogits(tokens(1.0), tokens(-1.0))


def build_store(path: Path, n_features: int, context: int, interpreted: float) -> float:
    """Write the synthetic store; seconds taken."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    pools = {"top_activations": 10, "band_0.4_0.6": 5, "non_activating": 5}
    cfg = SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=576, d_sae=n_features, act_fn="topk", top_k=64)
    metrics = {"metrics/explained_variance": 0.81, "metrics/l0": 64.0, "metrics/dead_fraction": 0.05}
    with SQLiteRecordStore(path) as store:
        store.add_model(MODEL, LanguageModelConfig(model_name=MODEL).model_dump(mode="json"))
        store.add_dictionary(DictionaryRecord(NAME, SERIES, "/bench/sae", cfg.model_dump(mode="json"), MODEL, metrics))
        for start in range(0, n_features, WRITE_CHUNK):
            chunk = [synthetic_analysis(rng, context, pools) for _ in range(min(WRITE_CHUNK, n_features - start))]
            store.add_feature_analyses(NAME, SERIES, chunk, start_index=start)
            logits = {start + i: synthetic_logits(rng) for i in range(len(chunk))}
            store.set_feature_logits(NAME, SERIES, logits)
        words = ["code", "python", "url", "error", "list", "number", "name", "function", "string", "class"]
        for index in sorted(random.Random(0).sample(range(n_features), int(interpreted * n_features))):
            explanation = f"the word {words[index % len(words)]} in {words[(index // 10) % len(words)]} contexts"
            scores = [
                InterpretationScore(method, 0.7, float(rng.random()), 0.7, 0.7, 20, True)
                for method in ("detection", "fuzzing")
            ]
            details = {"prompt": "x" * 800, "response": explanation}
            store.set_interpretation(
                NAME, SERIES, index, Interpretation(explanation, "bench-llm", scores, None, details)
            )
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(store: Path, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "lm_saes_core.cli", "serve", "--store", str(store), "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"lm-saes serve exited with {server.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    stop_server(server)
    raise RuntimeError("lm-saes serve did not listen within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_to_first_byte(port: int, path: str) -> float:
    """Seconds from sending a GET to reading the status line; the body is read (and checked) afterwards."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.connect()
    started = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    elapsed = time.perf_counter() - started
    body = response.read()
    connection.close()
    if response.status != 200 or not body:
        raise RuntimeError(f"GET {path} answered {response.status}")
    return elapsed


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=65536)
    parser.add_argument("--context", type=int, default=64, help="tokens per sample context")
    parser.add_argument("--interpreted", type=float, default=0.1, help="fraction of features with an explanation")
    parser.add_argument("--restarts", type=int, default=3, help="server starts for the cold timings")
    parser.add_argument("--warm", type=int, default=20, help="warm requests per page kind")
    parser.add_argument("--store", type=Path, default=None, help="store file (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="reuse --store when it exists; keep it afterwards")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="lm_saes_browser_bench_"))
    store = args.store or workdir / "records.sqlite"
    if store.exists() and args.keep:
        build_s = None
    else:
        store.unlink(missing_ok=True)
        build_s = build_store(store, args.features, args.context, args.interpreted)
    size_mb = store.stat().st_size / 2**20

    rng = random.Random(1)
    table_path = f"/dictionaries/{NAME}?series={SERIES}&sort=frequency&desc=1&page={{page}}"
    api_table_path = f"/api/dictionaries/{NAME}/features?series={SERIES}&sort=max_activation&desc=1&page={{page}}"
    feature_path = f"/dictionaries/{NAME}/features/{{index}}?series={SERIES}"
    kinds = {
        "feature page (HTML)": lambda: feature_path.format(index=rng.randrange(args.features)),
        "feature table sorted by frequency, with histogram (HTML)": lambda: table_path.format(
            page=rng.randrange(1, args.features // 50)
        ),
        "feature table sorted by max activation (JSON)": lambda: api_table_path.format(
            page=rng.randrange(1, args.features // 50)
        ),
    }
    cold: dict[str, list[float]] = {kind: [] for kind in kinds}
    warm: dict[str, list[float]] = {kind: [] for kind in kinds}
    server_cpu: dict[str, float] = {}  # the server's CPU seconds per warm request
    load_before = os.getloadavg()[0]
    with open(workdir / "server.log", "wb") as log:
        for _ in range(args.restarts):
            for kind, next_path in kinds.items():  # each kind's cold request on its own fresh server
                port = free_port()
                server = start_server(store, port, log)
                try:
                    cold[kind].append(time_to_first_byte(port, next_path()))
                finally:
                    stop_server(server)
        port = free_port()
        server = start_server(store, port, log)
        try:
            for kind, next_path in kinds.items():
                time_to_first_byte(port, next_path())  # warms this kind's templates and the tokenizer
                cpu_start = cpu_seconds(server.pid)
                warm[kind] = [time_to_first_byte(port, next_path()) for _ in range(args.warm)]
                server_cpu[kind] = (cpu_seconds(server.pid) - cpu_start) / args.warm
        finally:
            stop_server(server)

    baselines = {}
    with SQLiteRecordStore(store, read_only=True) as records:

        def median_s(call, n: int = args.warm) -> tuple[float, float]:
            """Median wall and CPU seconds of `call`."""
            walls, cpus = [], []
            for _ in range(n):
                started, cpu_started = time.perf_counter(), time.thread_time()
                call()
                walls.append(time.perf_counter() - started)
                cpus.append(time.thread_time() - cpu_started)
            return statistics.median(walls), statistics.median(cpus)

        baselines["feature page (HTML)"] = (
            "get_feature",
            median_s(lambda: records.get_feature(NAME, SERIES, rng.randrange(args.features))),
        )
        page = lambda sort: records.feature_page(  # noqa: E731
            NAME, SERIES, sort=sort, descending=True, limit=50, offset=50 * rng.randrange(1, args.features // 50)
        )
        frequencies = median_s(lambda: records.feature_frequencies(NAME, SERIES))
        sorted_page = median_s(lambda: page("frequency"))
        baselines["feature table sorted by frequency, with histogram (HTML)"] = (
            "feature_page + feature_frequencies",
            (sorted_page[0] + frequencies[0], sorted_page[1] + frequencies[1]),
        )
        baselines["feature table sorted by max activation (JSON)"] = (
            "feature_page",
            median_s(lambda: page("max_activation")),
        )

    console = Console(width=200)
    built = f"built in {build_s:.0f} s" if build_s is not None else "reused"
    console.print(
        f"store: {args.features:,} features, {args.context}-token contexts (20 per feature), "
        f"{args.interpreted:.0%} interpreted; {size_mb:,.0f} MiB SQLite ({built}); {store}"
    )
    table = Table(
        "page",
        "cold TTFB ms",
        "warm TTFB ms",
        "server CPU ms / warm request",
        "baseline (in-process store call)",
        "baseline ms (CPU ms)",
        "warm / baseline",
    )
    for kind in kinds:
        name, (baseline, baseline_cpu) = baselines[kind]
        warm_ms = statistics.median(warm[kind]) * 1000
        table.add_row(
            kind,
            f"{statistics.median(cold[kind]) * 1000:.0f}",
            f"{warm_ms:.1f}",
            f"{server_cpu[kind] * 1000:.1f}",
            name,
            f"{baseline * 1000:.1f} ({baseline_cpu * 1000:.1f})",
            f"{warm_ms / (baseline * 1000):.1f}x",
        )
    console.print(table)
    console.print(
        f"cold: median of {args.restarts} fresh servers; warm: median of {args.warm} requests; target warm < 200 ms. "
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs: "
        "other work on the machine inflates wall times, not the CPU columns."
    )
    if not args.keep:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
