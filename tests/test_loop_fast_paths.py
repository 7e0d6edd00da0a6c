"""The training loop's fast paths give exactly what the plain paths give: the prefetching stream (same batches, same
order, same errors), the reused shuffle buffer (the batches of concatenate-then-permute, rows marked to drop
dropped), the chunk reader (the sizes its sidecars recorded, the files' tensors), the feature activity counted from
the sparse selection (the dense count), the gradient norm by blocks and the metric window's kept temporary (the plain
sums), a run with prefetching (the weights and metrics of a run without), and the feature analysis from the sparse
selection (the analysis of the dense activations); and freed memory kept between steps is not faulted in again."""

import ctypes
import itertools
import json
import random
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lm_saes_core.activation.buffer import KEEP, ActivationBatcher, concat_items, n_rows, take_rows
from lm_saes_core.activation.cache_format import ActivationCacheError
from lm_saes_core.activation.config import ActivationFactoryConfig, BufferShuffleConfig
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.activation.reader import CachedActivations, written_bytes
from lm_saes_core.activation.writer import ActivationWriter, ActivationWriterConfig
from lm_saes_core.analysis import FeatureAnalyzer, FeatureAnalyzerConfig
from lm_saes_core.analysis.feature_analyzer import SparseFeatureActs, encode_contexts
from lm_saes_core.models import CLTConfig, CrossCoderConfig, LossConfig, SAEConfig, SparseDictionary
from lm_saes_core.models.losses import LossOutput
from lm_saes_core.training import Trainer, TrainerConfig
from lm_saes_core.training.batches import Prefetched
from lm_saes_core.training.memory import _glibc, freed_memory_kept
from lm_saes_core.training.metrics import FeatureActivity, MetricWindow
from lm_saes_core.training.optim import GradShards, rms_grad_norm, square_sum

HOOK = "blocks.1.hook_resid_post"
D = 16


def cache_items(n_items: int = 12, rows: int = 4, context: int = 8, seed: int = 0):
    """2-D items as the factory writes them; the first position of every row is masked out (BOS)."""
    generator = torch.Generator().manual_seed(seed)
    for index in range(n_items):
        mask = torch.ones(rows, context, dtype=torch.bool)
        mask[:, 0] = False
        mask[index % rows, -(index % 3) :] = False  # rows of different lengths
        yield {
            HOOK: torch.randn(rows, context, D, generator=generator) * 3,
            "tokens": torch.randint(3, 1000, (rows, context), generator=generator),
            "mask": mask,
            "attention_mask": torch.ones(rows, context, dtype=torch.bool),
            "doc_index": torch.full((rows, context), index),
            "doc_position": torch.arange(context).repeat(rows, 1),
            "source_idx": torch.zeros(rows, context, dtype=torch.long),
        }


@pytest.fixture
def cache(tmp_path):
    cfg = ActivationWriterConfig(hook_points=[HOOK], cache_dir=str(tmp_path / "cache"), n_samples_per_chunk=4)
    ActivationWriter(cfg, provenance={"dataset_name": "synthetic"}).write(cache_items())
    return tmp_path / "cache"


def factory_stream(cache, epoch: int = 0):
    cfg = ActivationFactoryConfig(
        sources=[{"type": "activations", "name": "c", "path": str(cache), "shuffle_chunks": True}],
        target="activations-1d", hook_points=[HOOK], batch_size=24, buffer_size=96, buffer_shuffle={"perm_seed": 3},
    )  # fmt: skip
    return ActivationFactory(cfg).process(epoch=epoch)


def assert_same_batches(expected: list[dict], actual: list[dict], any_row_order: bool = False) -> None:
    """Batch for batch the same tensors; `any_row_order`: the same rows in each batch, in any order (rows named by
    their unique `tokens`)."""
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        assert a.keys() == b.keys()
        order_a, order_b = (batch["tokens"].argsort() if any_row_order else slice(None) for batch in (a, b))
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key][order_a], b[key][order_b]), key


# ---------------------------------------------------------------- prefetching


def test_prefetched_stream_yields_the_same_batches_in_the_same_order(cache):
    plain = list(factory_stream(cache))
    for depth in (0, 1, 3):
        with Prefetched(factory_stream(cache), depth) as prefetched:
            assert_same_batches(plain, list(prefetched))
        assert next(prefetched, None) is None  # exhausted stays exhausted


def test_prefetched_stream_raises_the_error_where_the_batch_would_have_been():
    def failing():
        yield {"x": torch.zeros(1)}
        yield {"x": torch.ones(1)}
        raise OSError("disk gone")

    with Prefetched(failing(), 2) as prefetched:
        assert next(prefetched)["x"].item() == 0
        assert next(prefetched)["x"].item() == 1
        with pytest.raises(OSError, match="disk gone"):
            next(prefetched)


def test_closing_a_prefetched_stream_stops_its_thread_and_leaves_the_stream_usable():
    endless = ({"x": torch.tensor([i])} for i in itertools.count())
    prefetched = Prefetched(endless, 2)
    assert [next(prefetched)["x"].item() for _ in range(3)] == [0, 1, 2]
    prefetched.close()
    assert not prefetched._thread.is_alive()
    following = next(endless)["x"].item()  # the owner reads on: nothing was lost beyond what was read ahead
    assert 3 <= following <= 3 + 2 + 1


# ---------------------------------------------------------------- the shuffle buffer


def concatenate_then_permute(batch_size: int, buffer_size: int | None, seed: int, items):
    """The batcher as it was before it reused its memory: the reference for its batches."""
    generator = torch.Generator().manual_seed(seed)

    def permute(buffer):
        return take_rows(buffer, torch.randperm(n_rows(buffer), generator=generator))

    pending, rows, threshold = [], 0, buffer_size or batch_size
    for item in items:
        pending.append(item)
        rows += n_rows(item)
        if rows < threshold:
            continue
        buffer, start = concat_items(pending), 0
        if buffer_size is not None:
            buffer = permute(buffer)
        keep = batch_size if buffer_size is None else max(buffer_size // 2, batch_size)
        while rows - start >= keep:
            yield take_rows(buffer, slice(start, start + batch_size))
            start += batch_size
        pending = [take_rows(buffer, slice(start, rows))] if start < rows else []
        rows -= start
    if rows:
        buffer = concat_items(pending)
        if buffer_size is not None:
            buffer = permute(buffer)
        for start in range(0, rows, batch_size):
            yield take_rows(buffer, slice(start, start + batch_size))


def random_batching(rng: random.Random) -> tuple[int, int | None, int, list[int]]:
    """A random case of the batcher: (batch size, buffer size or None, shuffle seed, the items' row counts)."""
    batch_size = rng.randint(1, 20)
    buffer_size = rng.choice([None, batch_size, batch_size + rng.randint(1, 100)])
    return batch_size, buffer_size, rng.randint(0, 5), [rng.randint(0, 60) for _ in range(rng.randint(0, 30))]


@pytest.mark.parametrize("hold_items", [True, False], ids=["items-held", "rows-copied"])
def test_shuffle_buffer_gives_the_batches_of_concatenate_then_permute(hold_items):
    """Holding the items (CPU), each batch has the rows of concatenate-then-permute, grouped by item; copying them
    into slots (GPU), the same rows in the same order."""
    rng = random.Random(0)
    for _ in range(200):
        batch_size, buffer_size, seed, sizes = random_batching(rng)

        def items(sizes=sizes):
            start = 0
            for n in sizes:
                rows = torch.arange(start, start + n)
                yield {"x": torch.randn(n, 3), "tokens": rows, "doc_index": rows * 7, "mask": rows % 2 == 0}
                start += n

        torch.manual_seed(0)
        expected = list(concatenate_then_permute(batch_size, buffer_size, seed, items()))
        torch.manual_seed(0)
        batcher = ActivationBatcher(batch_size, buffer_size, BufferShuffleConfig(perm_seed=seed), hold_items)
        assert_same_batches(expected, list(batcher(items())), any_row_order=hold_items)


@pytest.mark.parametrize("hold_items", [True, False], ids=["items-held", "rows-copied"])
def test_rows_marked_to_drop_leave_the_batches_of_items_that_never_had_them(hold_items):
    """`KEEP` (flattened sequences' padding and BOS, never buffered) against the rows selected first."""
    rng = random.Random(1)
    for _ in range(150):
        batch_size, buffer_size, seed, sizes = random_batching(rng)
        kinds = [rng.choice(["some", "all", "none"]) for _ in sizes]

        def items(marked: bool, sizes=sizes, kinds=kinds):
            start = 0
            for n, kind in zip(sizes, kinds, strict=True):
                rows = torch.arange(start, start + n)
                keep = {"some": rows % 3 != 0, "all": rows >= 0, "none": rows < 0}[kind]
                item = {"x": rows[:, None] * 0.5 + torch.arange(3), "tokens": rows}
                yield {**item, KEEP: keep} if marked else take_rows(item, keep.nonzero().squeeze(1))
                start += n

        expected = list(concatenate_then_permute(batch_size, buffer_size, seed, items(marked=False)))
        batcher = ActivationBatcher(batch_size, buffer_size, BufferShuffleConfig(perm_seed=seed), hold_items)
        assert_same_batches(expected, list(batcher(items(marked=True))), any_row_order=hold_items)


def test_a_buffer_holding_items_lets_them_go_and_keeps_about_two_buffers_of_them():
    """On CPU the buffer holds the items it reads (no copy on arrival); an item is let go, its last rows copied into
    the slot store, once few of its rows remain, so the memory held stays bounded however long the stream is."""
    alive: list[weakref.ref] = []

    def items():
        for index in range(300):
            rows = torch.arange(64 * index, 64 * (index + 1))
            item = {"x": rows[:, None] * 1.0, "tokens": rows}
            alive.append(weakref.ref(item["x"]))
            yield item

    held = []
    seen = []
    for batch in ActivationBatcher(32, 512, BufferShuffleConfig(perm_seed=0))(items()):
        held.append(sum(ref() is not None for ref in alive))
        seen.append(batch["tokens"])
        assert torch.equal(batch["x"][:, 0], batch["tokens"] * 1.0)
    assert sorted(torch.cat(seen).tolist()) == list(range(300 * 64))
    assert max(held) * 64 <= 3 * 512  # about two buffers of rows held (ages 0-3 at half a buffer each), not 300 items
    assert max(held) * 64 >= 512  # and the buffer's rows are held where they arrived, not copied


def test_shuffle_buffer_refuses_items_with_other_keys():
    batcher = ActivationBatcher(2, 8)
    items = [{"x": torch.zeros(3), "y": torch.zeros(3)}, {"x": torch.zeros(3)}]
    with pytest.raises(ValueError, match="same keys"):
        list(batcher(items))


# ---------------------------------------------------------------- reading chunk files


def test_the_written_size_is_read_from_the_sidecars_head_or_from_the_whole_sidecar(cache, tmp_path):
    chunk = cache / HOOK / "chunk-00000001.json"
    sidecar = json.loads(chunk.read_text())
    assert written_bytes(chunk) == sidecar["file_bytes"] == (cache / HOOK / "chunk-00000001.safetensors").stat().st_size
    reordered = tmp_path / "reordered.json"  # file_bytes after 10 kB of token lists: the whole sidecar is parsed
    reordered.write_text(json.dumps({"tokens": list(range(3000)), "file_bytes": 1234}))
    assert written_bytes(reordered) == 1234
    with pytest.raises(ActivationCacheError, match="missing file"):
        written_bytes(tmp_path / "absent.json")


def test_chunks_read_in_the_reader_threads_are_the_files_tensors(cache):
    reader = CachedActivations(cache)
    for chunk in reader.chunks:
        expected = load_file(str(reader.chunk_file(HOOK, chunk["name"])))
        item = reader.load_chunk(chunk)
        assert torch.equal(item[HOOK], expected["activation"])
        assert all(torch.equal(item[key], value) for key, value in expected.items() if key != "activation")


# ---------------------------------------------------------------- feature activity


def dense_activity(feature_acts: torch.Tensor, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    f = feature_acts.detach().reshape(-1, n_features)
    return (f > 0).sum(0).float(), f.sum()


@pytest.mark.parametrize(
    "config",
    [
        SAEConfig(d_model=D, d_sae=64, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="topk", top_k=4,
                  norm_activation="inference"),
        SAEConfig(d_model=D, d_sae=64, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="batchtopk", top_k=4,
                  sparsity_include_decoder_norm=True, norm_activation="inference"),
        CrossCoderConfig(d_model=D, d_sae=48, heads=["a", "b", "c"], act_fn="topk", top_k=3,
                         norm_activation="inference"),
        CLTConfig(d_model=D, d_sae=32, hook_points_in=["i0", "i1"], hook_points_out=["o0", "o1"], act_fn="layertopk",
                  top_k=6, norm_activation="inference"),
        CLTConfig(d_model=D, d_sae=32, hook_points_in=["i0", "i1"], hook_points_out=["o0", "o1"],
                  act_fn="batchlayertopk", top_k=6, norm_activation="inference"),
    ],
    ids=["sae-topk", "sae-batchtopk-gated", "crosscoder-topk", "clt-layertopk", "clt-batchlayertopk"],
)  # fmt: skip
def test_activity_from_the_sparse_selection_is_the_dense_count(config):
    torch.manual_seed(0)
    model = SparseDictionary.from_config(config)
    model.sparse_kernels = True
    batch = {hook: torch.randn(200, D) for hook in config.hook_points}
    out = model.compute_loss(batch, LossConfig().coefficients())
    counted = model.feature_activity(out.feature_acts)
    assert counted is not None  # the sparse path kept its selection
    counts, total = counted
    dense_counts, dense_total = dense_activity(out.feature_acts, model.n_features)
    assert torch.equal(counts, dense_counts)
    assert total.item() == pytest.approx(dense_total.item(), rel=1e-5)
    assert FeatureActivity.of(model, out.feature_acts).counts is not None
    assert model.feature_activity(out.feature_acts.clone()) is None  # another tensor: counted densely
    assert torch.equal(FeatureActivity.of(model, out.feature_acts.clone()).counts, dense_counts)


@pytest.mark.parametrize(
    "config",
    [
        CrossCoderConfig(d_model=D, d_sae=48, heads=["a", "b", "c"], act_fn="topk", top_k=3,
                         norm_activation="inference"),
        CLTConfig(d_model=D, d_sae=32, hook_points_in=["i0", "i1"], hook_points_out=["o0", "o1"],
                  act_fn="batchlayertopk", top_k=6, norm_activation="inference"),
    ],
    ids=["crosscoder", "clt"],
)  # fmt: skip
@pytest.mark.parametrize("n_tokens", [37, 200, 1001])
def test_group_statistics_from_the_sparse_selection_are_the_dense_ones(config, n_tokens):
    torch.manual_seed(n_tokens)
    model = SparseDictionary.from_config(config)
    model.sparse_kernels = True
    out = model.compute_loss({hook: torch.randn(n_tokens, D) for hook in config.hook_points})
    fast = model.group_statistics(out.label, out.reconstructed, out.feature_acts)
    dense = model.group_statistics(out.label, out.reconstructed, out.feature_acts.clone())  # not the selection's
    assert list(fast) == list(dense) and any(key.endswith(("l0", f"l0_layer{0}")) for key in fast)
    for key, value in dense.items():
        assert torch.equal(fast[key], value), key


@pytest.mark.parametrize("act_fn", ["relu", "topk"])
def test_the_metric_window_gives_a_clt_the_values_it_computes_itself(act_fn):
    """The window hands `group_statistics` its own errors and activity counts: the report is bitwise the one of the
    model computing them from the label and the dense activations."""
    torch.manual_seed(0)
    config = CLTConfig(d_model=D, d_sae=32, hook_points_in=["i0", "i1", "i2"], hook_points_out=["o0", "o1", "o2"],
                       act_fn=act_fn, top_k=4, norm_activation="inference")  # fmt: skip
    model = SparseDictionary.from_config(config)
    window = MetricWindow(model.n_features, "cpu", 3, model.group_statistics)
    expected = {}
    for n_tokens in (37, 200):
        out = model.compute_loss({hook: torch.randn(n_tokens, D) for hook in config.hook_points})
        window.update(out, FeatureActivity.of(model, out.feature_acts), torch.ones(()), torch.ones(()))
        dense = model.group_statistics(out.label, out.reconstructed, out.feature_acts.clone())
        for key, value in dense.items():
            expected[key] = expected.get(key, 0) + value
    report = window.report()
    assert any(key.startswith("metrics/l0_layer") for key in expected)
    for key, value in expected.items():
        assert report[key] == (value / 2).item(), key


# ---------------------------------------------------------------- gradient norm and metric window


@pytest.mark.parametrize("shape", [(), (7,), (4096,), (576, 4608), (3, 5000)])
def test_square_sum_by_blocks_is_the_sum_of_squares(shape):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    exact = tensor.double().square().sum()
    assert square_sum(tensor).dtype == torch.float32
    assert abs(float(square_sum(tensor)) - float(exact)) <= 1e-6 * float(exact)
    assert abs(float(tensor.square().sum()) - float(exact)) <= 1e-6 * float(exact)  # the plain path, as accurate


def test_the_rms_gradient_norm_counts_exactly_the_non_zero_entries():
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(64, 300), (300,), (300, 64), (64,)]]
    for parameter in parameters:
        grad = torch.randn(parameter.shape, generator=generator)
        grad[..., ::3] = 0
        grad.view(-1)[1] = -0.0  # a zero for the count
        grad.view(-1)[4] = 1e-42  # subnormal: not zero, though its square is
        parameter.grad = grad
    squares = sum(float(p.grad.double().square().sum()) for p in parameters)
    count = sum(int((p.grad != 0).sum()) for p in parameters)
    assert float(rms_grad_norm(parameters)) == pytest.approx((squares / count) ** 0.5, rel=1e-6)
    shards = GradShards(parameters[:2], sum_over_shards=lambda totals: totals)  # one shard: the same value
    assert float(rms_grad_norm(parameters, shards)) == pytest.approx((squares / count) ** 0.5, rel=1e-6)


def test_the_metric_window_reuses_its_temporary_and_reports_the_plain_values():
    """Batches of changing sizes and output hooks: the scratch tensor regrown or reused gives the values of fresh
    temporaries, computed here as the window did before it kept one."""
    generator = torch.Generator().manual_seed(0)
    for n_outputs in (1, 3):
        window = MetricWindow(8, "cpu", n_outputs)
        errors, spreads = [], []
        for n in (20, 50, 10):
            shape = (n, n_outputs, 6) if n_outputs > 1 else (n, 6)
            label, reconstructed = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
            out = LossOutput(torch.tensor(1.0), {}, torch.rand(n, 8), torch.rand(n, 8), reconstructed, label, n)
            window.update(out, FeatureActivity(torch.ones(8), torch.tensor(2.0)), torch.ones(()), torch.ones(()))
            errors.append((reconstructed - label).square().sum(-1))
            spreads.append((label - label.mean(0)).square().sum(-1))
        report = window.report()
        expected = sum(float(1 - e.mean() / s.mean()) for e, s in zip(errors, spreads, strict=True)) / 3
        assert report["metrics/explained_variance"] == pytest.approx(expected, rel=1e-6)
        legacy = sum(float((1 - e / s).mean()) for e, s in zip(errors, spreads, strict=True)) / 3
        assert report["metrics/explained_variance_legacy"] == pytest.approx(legacy, rel=1e-6)


def test_a_step_maps_no_fresh_memory_while_freed_memory_is_kept():
    """Inside `freed_memory_kept` (glibc) a large tensor comes from the heap and stays there once freed, so the next
    step reuses its pages; outside, one past 32 MiB is mapped afresh (and faulted in again).
    Read from glibc's own accounting (`mallinfo2`), not page-fault counters, which some kernels (gVisor) leave at 0."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc 2.33 or later only")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip

    libc.mallinfo2.restype = MallInfo2
    size = 48_000_000

    def mapped_while_alive_and_kept_once_freed(n_bytes: int) -> tuple[int, int]:
        before = libc.mallinfo2().hblkhd
        tensor = torch.empty(n_bytes // 4).fill_(1)
        mapped = libc.mallinfo2().hblkhd - before
        del tensor
        return mapped, libc.mallinfo2().fordblks

    with freed_memory_kept():
        with freed_memory_kept():  # nested (concurrent fits): the settings stay until the outer one ends
            pass
        mapped, kept = mapped_while_alive_and_kept_once_freed(size)
        assert mapped < size and kept >= size
    # glibc's defaults again: larger than every free chunk the heap kept (which a request reuses before it maps)
    larger = libc.mallinfo2().fordblks + size
    mapped, _ = mapped_while_alive_and_kept_once_freed(larger)
    assert mapped >= larger


# ---------------------------------------------------------------- a run


def test_a_run_with_prefetching_equals_one_without(cache, tmp_path):
    def run(prefetch: int, out: str):
        torch.manual_seed(0)
        cfg = SAEConfig(
            d_model=D,
            d_sae=64,
            hook_point_in=HOOK,
            hook_point_out=HOOK,
            act_fn="topk",
            top_k=4,
            norm_activation="inference",
        )
        model = SparseDictionary.from_config(cfg)
        trainer_cfg = TrainerConfig(
            loss=LossConfig(auxk_coefficient=1 / 32, k_aux=8, dead_threshold=48), lr=1e-3,
            total_training_tokens=24 * 12, log_frequency=4, n_checkpoints=0, exp_result_path=str(tmp_path / out),
        )  # fmt: skip
        stream = itertools.chain.from_iterable(factory_stream(cache, epoch) for epoch in itertools.count())
        result = Trainer(trainer_cfg, prefetch=prefetch).fit(model, stream)
        return model.state_dict(), result.last_metrics

    (plain, plain_metrics), (prefetched, prefetched_metrics) = run(0, "plain"), run(3, "prefetched")
    assert plain_metrics == prefetched_metrics and "losses/aux_loss" in plain_metrics
    for name, value in plain.items():
        assert torch.equal(value, prefetched[name]), name


# ---------------------------------------------------------------- analysis


def assert_same_analyses(expected, actual) -> None:
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        for name in ("act_times", "n_analyzed_tokens", "max_feature_acts", "mean_feature_acts"):
            assert getattr(a, name) == getattr(b, name), name
        assert np.array_equal(a.histogram_counts, b.histogram_counts)
        for pool_a, pool_b in zip(a.samples, b.samples, strict=True):
            assert pool_a.name == pool_b.name and pool_a.dataset == pool_b.dataset
            for field in ("tokens", "activations", "lengths", "doc_index", "doc_position"):
                assert np.array_equal(getattr(pool_a, field), getattr(pool_b, field)), (pool_a.name, field)


@pytest.mark.parametrize(
    "config",
    [
        SAEConfig(d_model=D, d_sae=64, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="topk", top_k=4,
                  norm_activation="inference"),
        SAEConfig(d_model=D, d_sae=64, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="batchtopk", top_k=4,
                  sparsity_include_decoder_norm=True, norm_activation="inference"),
        CLTConfig(d_model=D, d_sae=32, hook_points_in=["i0", "i1"], hook_points_out=["o0", "o1"], act_fn="layertopk",
                  top_k=6, norm_activation="inference"),
    ],
    ids=["sae-topk", "sae-batchtopk", "clt-layertopk"],
)  # fmt: skip
def test_analysis_from_the_sparse_selection_equals_the_dense_one(config):
    torch.manual_seed(0)
    model = SparseDictionary.from_config(config)
    if config.act_fn == "batchtopk":
        model.activation_function.topk_threshold.fill_(0.3)  # the inference threshold
    items = [
        {
            **{hook: torch.randn(6, 8, D) * 2 for hook in config.hook_points},
            **{k: v for k, v in item.items() if k != HOOK},
        }
        for item in cache_items(n_items=5, rows=6)
    ]
    analyzer = FeatureAnalyzer(FeatureAnalyzerConfig(total_analyzing_tokens=10_000, n_top=3, n_non_activating=2))
    assert isinstance(encode_contexts(model.eval(), items[0]), SparseFeatureActs)  # the sparse path is taken
    sparse = analyzer.analyze(model, items, progress=False)
    dense = analyzer.analyze_features(
        items, lambda item: model.eval().encode_batch({h: item[h] for h in config.hook_points}),
        n_features=model.n_features, progress=False,
    )  # fmt: skip
    assert_same_analyses(dense, sparse)


# ---------------------------------------------------------------- gated JumpReLU


class RecomputingGatedJumpReLU(torch.autograd.Function):
    """The gated JumpReLU as it was: the mask recomputed in backward, the window's three bounds tested apart."""

    @staticmethod
    def forward(ctx, x, norm, threshold, window):
        ctx.save_for_backward(x, norm, threshold)
        ctx.window = window
        return x * (x > threshold / norm)

    @staticmethod
    def backward(ctx, grad_output):
        x, norm, threshold = ctx.saved_tensors
        grad_x = grad_output * (x > threshold / norm)
        low, high = (threshold - ctx.window / 2) / norm, (threshold + ctx.window / 2) / norm
        in_window = (x > low) & (x < high) & (x > 0)
        grad_threshold = (grad_output * in_window).reshape(-1, *threshold.shape).sum(0) * (
            -threshold / (ctx.window * norm)
        )
        return grad_x, None, grad_threshold, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0.5, 2.0])
def test_gated_jumprelu_keeps_its_mask_and_gives_the_same_values_and_gradients(dtype, window):
    from lm_saes_core.models.activation_functions import gated_jumprelu

    torch.manual_seed(0)
    x, norm = (torch.randn(300, 50) * 0.3).to(dtype), (torch.rand(50) + 0.1).to(dtype)
    threshold, grad = (torch.rand(50) * 0.2).to(dtype), torch.randn(300, 50).to(dtype)
    results = []
    for function in (RecomputingGatedJumpReLU.apply, gated_jumprelu):
        inputs, thresholds = x.clone().requires_grad_(), threshold.clone().requires_grad_()
        out = function(inputs, norm, thresholds, window)
        out.backward(grad)
        results.append((out.detach(), inputs.grad, thresholds.grad))
    for expected, actual in zip(*results, strict=True):
        assert torch.equal(expected, actual)
