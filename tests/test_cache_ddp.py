"""The feature cache under DDP (2 CPU processes, gloo): each rank serves its shard from it."""

import pytest
import torch


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # see conftest.py
def test_cached_ddp_equals_uncached_ddp(ddp_runs):
    out = ddp_runs / "cache"  # tests/cache_ddp_worker.py
    ranks = [torch.load(out / f"rank{i}.pt", weights_only=False) for i in (0, 1)]
    for r in ranks:
        cached, plain = r["cached"], r["plain"]
        # Phase 1 (frozen, epochs 0-1) and phase 2 (block5 on, epochs 2-3): each phase's first
        # epoch fills the cache through the images, its second is served from it.
        assert cached["active"] == [False, True, False, True]
        assert cached["builds"] == 4  # (train, val) once per phase
        assert plain["active"] == [False] * 4 and plain["builds"] == 0
        # Each rank gets the same shard, in the same order, as it gets from the images.
        assert cached["labels"] == plain["labels"]
        for name, value in cached["state"].items():
            torch.testing.assert_close(value, plain["state"][name], rtol=1e-4, atol=1e-5, msg=name)
        for name, value in cached["metrics"].items():
            assert abs(value - plain["metrics"][name]) < 1e-5, name
    assert ranks[0]["cached"]["labels"] != ranks[1]["cached"]["labels"]  # two different shards
    for name, value in ranks[0]["cached"]["state"].items():  # and DDP kept the ranks in step
        assert torch.equal(value, ranks[1]["cached"]["state"][name]), name
