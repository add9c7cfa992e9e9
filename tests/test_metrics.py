"""Metrics and full ranking: hand-computed cases, a brute-force numpy reference, chunking."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from gpu_marks import cuda
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from reolm.eval.metrics import MetricAccumulator, metric_names, metric_sums
from reolm.eval import ranking
from reolm.eval.ranking import evaluate_vectors, rank_targets, rank_with_score_fn
from reolm.eval.evaluate import evaluate_recommender, split_examples
from reolm.baselines.popularity import Popularity


def test_hand_computed_metrics_for_ranks_0_3_12():
    acc = MetricAccumulator(num_items=21)
    acc.add(torch.tensor([0, 3, 12]))
    m, pess = acc.result()
    assert m == pess  # no separate pessimistic ranks given
    assert m["NDCG@5"] == pytest.approx((1.0 + 1 / math.log2(5)) / 3)
    assert m["NDCG@10"] == pytest.approx((1.0 + 1 / math.log2(5)) / 3)
    assert m["NDCG@20"] == pytest.approx((1.0 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)
    assert m["Recall@5"] == pytest.approx(2 / 3)
    assert m["Recall@10"] == pytest.approx(2 / 3)
    assert m["Recall@20"] == pytest.approx(1.0)
    assert m["MRR"] == pytest.approx((1 + 1 / 4 + 1 / 13) / 3)
    assert m["AUC"] == pytest.approx((1 + (1 - 3 / 20) + (1 - 12 / 20)) / 3)


def test_cutoff_is_exclusive_rank_k_is_a_miss():
    acc = MetricAccumulator(num_items=100, ks=(5,))
    acc.add(torch.tensor([4, 5]))  # rank 4 is the 5th position (hit), rank 5 the 6th (miss)
    m, _ = acc.result()
    assert m["Recall@5"] == pytest.approx(0.5)
    assert m["NDCG@5"] == pytest.approx(0.5 / math.log2(6))


def test_rank_zero_gives_perfect_scores_and_last_rank_auc_zero():
    acc = MetricAccumulator(num_items=7)
    acc.add(torch.tensor([0]))
    assert all(v == pytest.approx(1.0) for v in acc.result()[0].values())
    acc = MetricAccumulator(num_items=7)
    acc.add(torch.tensor([6]))
    assert acc.result()[0]["AUC"] == pytest.approx(0.0)


def test_ties_optimistic_and_pessimistic_ranks():
    # 6 items, one user; the target (item 2) ties with items 0 and 4; item 5 scores higher.
    users = torch.tensor([[1.0]])
    items = torch.tensor([[2.0], [1.0], [2.0], [0.0], [2.0], [3.0]])
    opt, pess = rank_targets(users, items, torch.tensor([2]), item_chunk=2)
    assert opt.tolist() == [1] and pess.tolist() == [3]
    acc = evaluate_vectors(users, items, torch.tensor([2]))
    m, p = acc.result()
    assert m["MRR"] == pytest.approx(1 / 2) and p["MRR"] == pytest.approx(1 / 4)
    assert m["AUC"] == pytest.approx(1 - 1 / 5) and p["AUC"] == pytest.approx(1 - 3 / 5)


def test_batches_are_weighted_by_user_count_not_averaged():
    acc = MetricAccumulator(num_items=50)
    acc.add(torch.tensor([0]))             # batch of 1 user with MRR 1
    acc.add(torch.tensor([1, 1, 1]))       # batch of 3 users with MRR 1/2
    assert acc.result()[0]["MRR"] == pytest.approx((1 + 3 * 0.5) / 4)
    assert acc.count == 4


def _numpy_reference(users: np.ndarray, items: np.ndarray, targets: np.ndarray, ks=(5, 10, 20, 50)):
    scores = users @ items.T
    t = scores[np.arange(len(targets)), targets][:, None]
    rank = (scores > t).sum(1)
    out = {}
    for k in ks:
        out[f"NDCG@{k}"] = np.mean(np.where(rank < k, 1 / np.log2(rank + 2), 0.0))
    for k in ks:
        out[f"Recall@{k}"] = np.mean(rank < k)
    out["MRR"] = np.mean(1 / (rank + 1))
    out["AUC"] = np.mean(1 - rank / (items.shape[0] - 1))
    return out


def test_random_scores_match_brute_force_numpy():
    rng = np.random.default_rng(0)
    users = rng.standard_normal((97, 8))
    items = rng.standard_normal((300, 8))
    targets = rng.integers(0, 300, 97)
    expected = _numpy_reference(users, items, targets)
    acc = evaluate_vectors(torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(targets),
                           user_chunk=10, item_chunk=37)
    got, pess = acc.result()
    for name in metric_names():
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name
        assert pess[name] == pytest.approx(expected[name], abs=1e-12), name  # continuous scores: no ties


@pytest.mark.parametrize("user_chunk,item_chunk", [(1, 1), (7, 13), (64, 1000), (1000, 64)])
def test_chunked_ranking_equals_unchunked(user_chunk, item_chunk):
    torch.manual_seed(1)
    # Integer-valued vectors make many exact ties, so the pessimistic ranks differ too.
    users = torch.randint(-2, 3, (50, 4)).float()
    items = torch.randint(-2, 3, (200, 4)).float()
    targets = torch.randint(0, 200, (50,))
    whole_opt, whole_pess = rank_targets(users, items, targets, item_chunk=10**6)
    opt, pess = rank_targets(users, items, targets, item_chunk=item_chunk)
    assert torch.equal(opt, whole_opt) and torch.equal(pess, whole_pess)
    full = evaluate_vectors(users, items, targets, user_chunk=10**6, item_chunk=10**6).result()
    chunked = evaluate_vectors(users, items, targets, user_chunk=user_chunk, item_chunk=item_chunk).result()
    for got, want in zip(chunked, full):  # equal up to float summation order
        assert got == pytest.approx(want, rel=1e-12)
    assert full[0]["MRR"] > full[1]["MRR"]  # ties exist and are visible
    # and the ranks are those of a dense brute force with ties counted both ways
    dense = users @ items.T
    t = dense[torch.arange(50), targets][:, None]
    assert torch.equal(whole_opt, (dense > t).sum(1)) and torch.equal(whole_pess, (dense >= t).sum(1) - 1)


def test_cosine_with_temperature_ranks_by_cosine():
    users = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[10.0, 10.0], [1.0, 0.1], [0.0, 5.0]])  # dot prefers item 0, cosine item 1
    opt, _ = rank_targets(users, items, torch.tensor([1]), similarity="cosine", temperature=0.05)
    assert opt.tolist() == [0]
    opt, _ = rank_targets(users, items, torch.tensor([1]), similarity="dot")
    assert opt.tolist() == [1]


def test_score_function_api_and_shape_check():
    scores = torch.tensor([[0.5, 0.9, 0.1, 0.9]])
    opt, pess = rank_with_score_fn(lambda s, e: scores[:, s:e], lambda t: scores[0, t], torch.tensor([1]), 4, 3)
    assert (opt.tolist(), pess.tolist()) == ([0], [1])
    with pytest.raises(ValueError, match="shape"):
        rank_with_score_fn(lambda s, e: scores, lambda t: scores[0, t], torch.tensor([1]), 4, 2)


def test_metric_sums_rejects_single_item_catalogue():
    with pytest.raises(ValueError, match="at least 2 items"):
        metric_sums(torch.tensor([0]), 1)


def test_split_examples_follow_leave_one_out(tiny_domain):
    val = split_examples(tiny_domain, "val")
    test = split_examples(tiny_domain, "test")
    u = val.users[0]
    assert val.histories[0] == tiny_domain.train[u] and val.targets[0] == tiny_domain.val[u][0]
    assert test.histories[0] == tiny_domain.train[u] + tiny_domain.val[u]
    assert test.targets[0] == tiny_domain.test[u][0]


def test_evaluate_recommender_popularity_matches_hand_count(tiny_domain):
    model = Popularity(tiny_domain.num_items).fit(tiny_domain.train.values())
    result = evaluate_recommender(model, tiny_domain, "test", batch_size=7, progress=False)
    counts = model.counts.numpy()
    ex = split_examples(tiny_domain, "test")
    ranks = np.array([(counts > counts[t]).sum() for t in ex.targets])
    pess = np.array([(counts >= counts[t]).sum() - 1 for t in ex.targets])
    assert result.num_users == len(ex)
    assert result.metrics["MRR"] == pytest.approx(np.mean(1 / (ranks + 1)))
    assert result.metrics_pessimistic["MRR"] == pytest.approx(np.mean(1 / (pess + 1)))


@cuda
def test_cuda_ranking_equals_cpu():
    torch.manual_seed(0)
    users, items = torch.randint(-3, 4, (300, 16)).float(), torch.randint(-3, 4, (5000, 16)).float()
    targets = torch.randint(0, 5000, (300,))
    cpu = evaluate_vectors(users, items, targets, item_chunk=999).result()
    gpu = evaluate_vectors(users, items, targets, item_chunk=999, device="cuda").result()
    for a, b in zip(cpu, gpu):
        assert a == pytest.approx(b)


@pytest.mark.parametrize("itemsize", [4, 8])
def test_accelerator_ranking_blocks_are_capped_in_bytes(itemsize):
    """Validation ranks every user of a domain in one call: on an accelerator the users are cut
    into blocks whose scores fit :data:`ranking.DEVICE_BLOCK_BYTES`, not one 100k-user block."""
    cuda = torch.device("cuda")  # resolving the shape needs no GPU
    users, items = ranking._block_shape(100_000, 65536, cuda, itemsize)
    assert items == 65536 and 1 <= users < 100_000
    assert users * items * itemsize <= ranking.DEVICE_BLOCK_BYTES < (users + 1) * items * itemsize
    assert ranking._block_shape(300, 65536, cuda, itemsize) == (300, 65536)  # small calls stay one block
    assert ranking._block_shape(5, 10**12, cuda, itemsize) == (1, 10**12)   # never below one user


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_cpu_counter_ranks_exactly_like_dense_brute_force(dtype):
    from reolm.eval import rank_kernel

    assert rank_kernel.kernel_available()  # numba is a dependency: the fast path must be the one tested
    gen = torch.Generator().manual_seed(3)
    # Integer-valued vectors: many exact ties, so > and >= differ; one NaN item never counts above.
    users = torch.randint(-2, 3, (300, 4), generator=gen).to(dtype)
    items = torch.randint(-2, 3, (5000, 4), generator=gen).to(dtype)
    items[17] = float("nan")
    targets = torch.randint(0, 5000, (300,), generator=gen)
    targets[targets == 17] = 18
    block_users, block_items = ranking._block_shape(300, 65536, users.device)
    assert min(block_users, 300) * block_items >= rank_kernel.MIN_KERNEL_BLOCK  # the kernel is used
    opt, pess = rank_targets(users, items, targets)
    dense = users @ items.T
    t = dense[torch.arange(300), targets][:, None]
    assert torch.equal(opt, (dense > t).sum(1)) and torch.equal(pess, (dense >= t).sum(1) - 1)
    assert (pess > opt).any()


def test_compiled_counter_leaves_torch_thread_count_alone():
    """numba's OpenMP pool resets the caller's OpenMP thread count when it starts; a pre-training
    rank limited to one thread then ran oversubscribed after its first validation."""
    import subprocess
    import sys
    code = ("import torch; torch.set_num_threads(1)\n"
            "from reolm.eval.ranking import rank_targets\n"
            "g = torch.Generator().manual_seed(0)\n"
            "users, items = torch.randn(256, 8, generator=g), torch.randn(4096, 8, generator=g)\n"
            "opt, _ = rank_targets(users, items, torch.zeros(256, dtype=torch.long))\n"
            "from reolm.eval import rank_kernel; assert rank_kernel.kernel_available()\n"
            "import numba; numba.threading_layer()  # raises unless the kernel's parallel pool started\n"
            "print(torch.get_num_threads(), int(opt.sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    threads, total = out.stdout.split()
    assert threads == "1" and int(total) > 0
