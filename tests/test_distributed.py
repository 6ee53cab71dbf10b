"""DDP with 2 CPU processes (gloo): milestones unfreeze layers that DDP must all-reduce."""

import pytest
import torch
from tiny import run_worker

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp")]  # see conftest.py


def test_ddp_partial_regime_with_milestone(tmp_path):
    run_worker("ddp_worker.py", tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    block4 = {f"{i}.{p}" for i in (17, 19, 21) for p in ("weight", "bias")}
    block5 = {f"{i}.{p}" for i in (24, 26, 28) for p in ("weight", "bias")}
    for r in (r0, r1):
        changed = {k for k, v in r["final"].items() if not torch.equal(v, r["init"][k])}
        assert changed == block4 | block5  # frozen layers bit-identical on every rank
    for k in r0["final"]:  # block4, unfrozen at epoch 2 after DDP wrapped the model, was synced
        assert torch.equal(r0["final"][k], r1["final"][k]), k
    assert r0["metrics"] == r1["metrics"]  # metrics synced across ranks
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    # header + 9 images from both ranks, the padding repeat dropped, written once by rank 0
    assert [row.split(",")[0] for row in rows[1:]] == [str(i) for i in range(9)]
