"""Two gloo ranks on half a batch each give what one process gives on the whole batch."""
import multiprocessing as mp
import time

import pytest
import torch
import torch.distributed as dist

from dist_worker import STEPS, batch_worker, train, worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")


def _run(procs, timeout):
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(1, deadline - time.time()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"


def _read(out_dir, prefix):
    results, errors = {}, {}
    for r in range(2):
        if (out_dir / f"{prefix}rank{r}.pt").exists():
            results[r] = torch.load(out_dir / f"{prefix}rank{r}.pt")
        if (out_dir / f"{prefix}rank{r}.err").exists():
            errors[r] = (out_dir / f"{prefix}rank{r}.err").read_text()
    return results, errors


# The jobs that should succeed run in one pair of rank processes, each in a process group
# of its own (dist_worker.batch_worker): starting two ranks costs more than most jobs.
# Each test below reads its job's results; a job that fails leaves .err files, as alone.
LOOPS = [("mmpareto", "accum"), ("dgl", "accum"), ("multi", "accum"), ("mmpareto", "global"),
         ("multi", "global"), ("mmpareto", "missing"), ("dgl", "missing"), ("mmpareto", "branch"),
         ("dgl", "branch"), ("mmpareto", "branch1")]
JOBS = {
    **{f"equal-{m}-{mode}": (m, mode, "plain") for m in ("mmpareto", "dgl", "multi") for mode in ("plain", "ddp")},
    **{f"loop-{m}-{s}": (m, "ddp", s) for m, s in LOOPS},
    **{f"fsdp-{m}": (m, "fsdp", "plain") for m in ("mmpareto", "dgl", "multi")},
    **{f"fsdp-mp-{m}": (m, "fsdp-mp", "plain") for m in ("mmpareto", "dgl")},
    "uneven": ("mmpareto", "ddp", "uneven"),
}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-batch")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=batch_worker, args=(r, 2, str(out), JOBS)) for r in range(2)]
    _run(procs, 60 + 20 * len(JOBS))
    return lambda name: _read(out, f"{name}-")


def close(x, y, rtol=1e-5):
    return (x - y).abs().max().item() <= rtol * max(y.abs().max().item(), 1e-12)


def assert_equal_to_one_process(results, ref_grads, ref_params, rtol=1e-5):
    for r in range(2):
        grads, params = results[r]
        for step in range(STEPS):
            for i, (g, ref) in enumerate(zip(grads[step], ref_grads[step])):
                assert (g is None) == (ref is None), (r, step, i)
                if g is not None:
                    assert close(g, ref, rtol), (r, step, i)
        for p, ref in zip(params, ref_params):
            assert close(p, ref, rtol), r


@pytest.mark.parametrize("mode", ["plain", "ddp"])
@pytest.mark.parametrize("method", ["mmpareto", "dgl", "multi"])
def test_two_ranks_equal_one_process(batch, method, mode):
    ref_grads, ref_params = train(method)
    results, errors = batch(f"equal-{method}-{mode}")
    assert not errors, errors
    assert_equal_to_one_process(results, ref_grads, ref_params)
    # The halves disagree: a per-rank combine without communication would differ.
    local_grads, _ = train(method, rank=0, mode="local")
    assert any(not close(g, ref, rtol=1e-2) for g, ref in zip(local_grads[0], ref_grads[0]) if g is not None)


# The loops of tests/test_loops.py, with 2 ranks: accumulation (no_sync; the
# global-batch form), a modality missing on one rank, a branch taken from step 1 on.
@pytest.mark.parametrize("method,scenario", LOOPS, ids=[f"{m}-{s}" for m, s in LOOPS])
def test_training_loops_with_ddp(batch, method, scenario):
    ref_grads, ref_params = train(method, scenario)
    results, errors = batch(f"loop-{method}-{scenario}")
    assert not errors, errors
    assert_equal_to_one_process(results, ref_grads, ref_params)


@pytest.mark.parametrize("method", ["mmpareto", "dgl", "multi"])
def test_fsdp2_equals_one_process(batch, method):
    """fully_shard on each encoder and the model: 2 ranks with half the batch each give the
    published step on the whole batch (gathered for the comparison), within 3e-5."""
    ref_grads, ref_params = train(method)
    results, errors = batch(f"fsdp-{method}")
    assert not errors, errors
    assert_equal_to_one_process(results, ref_grads, ref_params, rtol=3e-5)


@pytest.mark.parametrize("method", ["mmpareto", "dgl"])
def test_fsdp2_mixed_precision(batch, method):
    """bf16 parameters, fp32 reduction: the definition on the gradients FSDP produces."""
    results, errors = batch(f"fsdp-mp-{method}")
    assert not errors, errors
    # the same bf16 forward and backward on both sides; only the combine's own rounding differs
    assert results[0] <= 1e-5 and results[1] <= 1e-5, results


def test_uneven_last_batch(batch):
    ref_grads, ref_params = train("mmpareto", "uneven")
    results, errors = batch("uneven")
    assert not errors, errors
    assert_equal_to_one_process(results, ref_grads, ref_params)


# The jobs where ranks fail: all at once, each pair in its own processes. Most of a job is
# a rank waiting out the process group's 15 s timeout, so together they take about as long
# as one. A job whose ranks are still alive at the deadline has hung.
FAILS = {
    "branch1-plain": ("mmpareto", "plain", "branch1", None),
    "bad-rank": ("mmpareto", "plain", "plain", 1),
    **{f"fail-{m}-{mode}": (m, mode, "fail", None) for m in ("mmpareto", "dgl", "multi")
       for mode in ("plain", "ddp", "fsdp")},
}


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    ctx = mp.get_context("spawn")
    jobs = {}
    for name, (method, mode, scenario, bad_rank) in FAILS.items():
        out = tmp_path_factory.mktemp(name)
        jobs[name] = (out, [ctx.Process(target=worker, args=(r, 2, str(out / "init"), str(out), method, mode,
                                                              scenario, bad_rank)) for r in range(2)])
    for _, procs in jobs.values():
        for p in procs:
            p.start()
    deadline = time.time() + 150
    for _, procs in jobs.values():
        for p in procs:
            p.join(max(1, deadline - time.time()))
    hung = {name for name, (_, procs) in jobs.items() if any(p.is_alive() for p in procs)}
    for _, procs in jobs.values():
        for p in procs:
            if p.is_alive():
                p.kill()
    return lambda name: (name not in hung, *_read(jobs[name][0], ""))


def test_branch_on_one_rank_without_ddp_is_a_clear_error(failures):
    """With process_group= only, mmfast cannot know a parameter another rank reached:
    every rank raises, naming the fix (ddp=), instead of hanging or averaging garbage."""
    finished, results, errors = failures("branch1-plain")
    assert finished, "a rank hung"
    assert len(errors) == 2, errors
    assert all("different parameters with gradients" in e and "ddp=" in e for e in errors.values()), errors


def test_a_failing_rank_does_not_hang_the_others(failures):
    finished, results, errors = failures("bad-rank")
    assert finished, "a rank hung"
    assert "missing the unimodal loss of group 'visual'" in errors.get(1, ""), errors
    assert "mmfast.MMPareto: all-reduce of" in errors.get(0, "") and "another rank" in errors[0], errors


@pytest.mark.parametrize("mode", ["plain", "ddp", "fsdp"])
@pytest.mark.parametrize("method", ["mmpareto", "dgl", "multi"])
def test_a_rank_failing_mid_training_fails_the_others(failures, method, mode):
    """Rank 1 raises at step 1, after a step of communication: rank 0, waiting in a collective
    (mmfast's all-reduces, DDP's or FSDP's), fails within the process group's 15 s timeout
    instead of hanging."""
    finished, results, errors = failures(f"fail-{method}-{mode}")
    assert finished, "a rank hung"
    assert "rank 1 fails at step 1" in errors.get(1, ""), errors
    assert 0 in errors and 0 not in results, (results.keys(), errors)
