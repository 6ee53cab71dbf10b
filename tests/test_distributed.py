"""DDP with 2 CPU processes (gloo): milestones unfreeze layers that DDP must all-reduce."""

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp")]  # see conftest.py


@pytest.fixture(scope="module")
def ranks(ddp_runs):
    """The worker's milestone run (2 processes) for both tests: VGG with predict, then RegNet."""
    out = ddp_runs / "milestone"  # tests/ddp_worker.py
    return out, [torch.load(out / f"rank{i}.pt", weights_only=True) for i in (0, 1)]


def test_ddp_partial_regime_with_milestone(ranks):
    out, (r0, r1) = ranks
    block4 = {f"{i}.{p}" for i in (17, 19, 21) for p in ("weight", "bias")}
    block5 = {f"{i}.{p}" for i in (24, 26, 28) for p in ("weight", "bias")}
    for r in (r0, r1):
        changed = {k for k, v in r["final"].items() if not torch.equal(v, r["init"][k])}
        assert changed == block4 | block5  # frozen layers bit-identical on every rank
    for k in r0["final"]:  # block4, unfrozen at epoch 2 after DDP wrapped the model, was synced
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    assert r0["metrics"] == r1["metrics"]  # metrics synced across ranks
    rows = (out / "predictions.csv").read_text().splitlines()
    # header + 9 images from both ranks, the padding repeat dropped, written once by rank 0
    assert [row.split(",")[0] for row in rows[1:]] == [str(i) for i in range(9)]


def test_ddp_batchnorm_family_with_milestone(ranks):
    """RegNet: block4 trains from epoch 0, block3 from epoch 2; stem, block1-2 stay frozen."""
    _, (r0, r1) = ranks
    for r in (r0, r1):
        init, final = r["bn_init"], r["bn_final"]
        changed = {k for k, v in final.items() if not torch.equal(v, init[k])}
        # Frozen units bit-identical on every rank, BatchNorm statistics included; every
        # tensor of the trainable units moved (the step counters of their BatchNorm too).
        assert changed == {k for k in init if k.split("_")[0] in ("block3", "block4")}
    for k, v in r0["bn_final"].items():  # parameters all-reduced, buffers broadcast from rank 0
        assert torch.equal(v, r1["bn_final"][k]), k
