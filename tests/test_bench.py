"""benchmarks/bench.py runs on a tiny setting and writes its table. No test asserts a time.

The harness lives beside the package, not in it; conftest.py puts benchmarks/ on sys.path.
"""

import math

import pytest
from bench import bench, main

TINY = {
    "backbone": "test_vgg16",  # the harness's logic does not depend on the network's size
    "image_size": 32,
    "batch_size": 8,
    "images": 16,
    "epochs": 2,
    "num_workers": 0,
    "bound_seconds": 0.05,
}
COLUMNS = (
    "| setup | regime | first epoch img/s | later epochs img/s | later ÷ first epoch time "
    "| arithmetic floor | first ÷ bound | later ÷ bound | bound img/s "
    "| vs plain PyTorch (first / later) | feature cache | peak RSS MB (start) | total s | load |"
)


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_tiny_frozen_with_peers(tmp_path):
    out = tmp_path / "bench.md"
    res = bench(**TINY, regimes="frozen", peers="torch,keras", uncached="frozen", output=str(out))

    assert set(res) >= {"config", "command", "machine", "bound", "decode", "rows", "notes"}
    assert _positive(res["bound"]["channels_last"]) and _positive(res["bound"]["nchw"])
    assert all(_positive(v) for v in res["decode"].values())
    assert res["config"]["train_images"] == 16

    rows = {(r["setup"], r["regime"]): r for r in res["rows"]}
    assert ("tlfinetune", "frozen") in rows
    assert ("plain PyTorch", "frozen") in rows
    for row in rows.values():
        assert [e["images"] for e in row["epochs"]] == [16, 16]
        assert _positive(row["first_ips"]) and _positive(row["later_ips"])
        assert _positive(row["peak_rss_mb"]) and _positive(row["total_s"])
        assert row["cache"] in ("yes", "no", "n/a")
        # Each row is divided by the bound measured around it, one of the run's measurements.
        assert min(res["bound"]["channels_last_all"]) <= row["bound"]
        assert row["bound"] <= max(res["bound"]["channels_last_all"])
    # One bound before the first row and one after each row.
    assert len(res["bound"]["channels_last_all"]) == len(res["rows"]) + 1
    off = rows.get(("tlfinetune, cache off", "frozen"))
    if off is not None:  # the package can switch its feature cache off: it must be off
        assert off["cache"] in ("no", "n/a")
    # TensorFlow is not a dependency: without it the Keras peer is skipped with a note.
    keras_rows = [r for r in res["rows"] if r["setup"].startswith("Keras")]
    if not keras_rows:
        assert any("TensorFlow is not installed" in n for n in res["notes"])

    text = out.read_text(encoding="utf-8")
    assert text == res["markdown"]
    assert COLUMNS in text
    assert "no_grad forward bound" in text and "Decode + transform alone" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "frozen" in line]
    assert len(table) == len(res["rows"])
    first = res["rows"][0]
    assert f"| {first['first_ips'] / first['bound']:.2f}× |" in table[0]
    assert res["command"].startswith("python benchmarks/bench.py ")


@pytest.mark.slow
def test_bench_command_line(tmp_path, capsys):
    out = tmp_path / "sub" / "table.md"
    args = [f"--{k}={v}" for k, v in TINY.items()]
    main([*args, "--regimes=partial", "--peers=none", "--uncached=none", f"--output={out}"])
    text = out.read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| tlfinetune | partial |")]
    assert len(rows) == 1
    cells = dict(
        zip(COLUMNS.strip("| ").split(" | "), rows[0].strip("| ").split(" | "), strict=True)
    )
    assert cells["feature cache"] == "yes"
    floor = float(cells["arithmetic floor"].removesuffix(" %"))  # block5 + head of the whole step
    assert 0 < floor < 100
    assert not [line for line in text.splitlines() if line.startswith("| plain PyTorch")]
    assert "| tlfinetune | partial |" in capsys.readouterr().out  # the table is printed too


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--image_size", "--batch_size", "--precision", "--regimes", "--peers", "--output"):
        assert flag in help_text


def test_bench_rejects_unknown_regime(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--regimes=frozen,bogus", f"--output={tmp_path / 'x.md'}"])
    assert exc.value.code == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_family_forward_speeds_print_a_ratio_per_backbone(capsys, one_thread):
    from families import families

    families("test_vgg16,test_regnet", batch=1, rounds=1, image_size=32)
    out = capsys.readouterr().out
    assert "test_vgg16" in out and "1.00x" in out and "test_regnet" in out


def test_seed_job_phases_add_up_to_the_whole_command():
    from bench_job import COLUMNS, split_job

    # Lightning's order: validation inside the training epoch, checkpoints after it.
    stamps = {
        "fit_start": 3.0,
        "sanity_start": 3.5,
        "sanity_end": 4.5,
        "epochs": [
            {"train_start": 5.0, "val_start": 14.0, "val_end": 15.0, "train_end": 15.0},
            {"train_start": 15.5, "val_start": 15.7, "val_end": 15.8, "train_end": 15.8},
            {"train_start": 16.0, "val_start": 16.2, "val_end": 16.3, "train_end": 16.3},
        ],
        "fit_end": 16.6,
    }
    parts = split_job(stamps, launch=1.0, exit_=18.0)
    assert parts["startup"] == pytest.approx(
        3.0
    )  # launch to the first epoch, less the sanity check
    assert parts["sanity"] == pytest.approx(1.0)
    assert (parts["first_train"], parts["first_val"]) == pytest.approx((9.0, 1.0))
    assert (parts["later_train"], parts["later_val"]) == pytest.approx((0.4, 0.2))
    assert parts["between"] == pytest.approx(0.5 + 0.2 + 0.3)  # the last: to the end of fit
    assert parts["end"] == pytest.approx(1.4)
    assert parts["in_fit"] == pytest.approx(13.6) and parts["epochs"] == 3
    phases = sum(parts[k] for k, _ in COLUMNS if k != "total")
    assert phases == pytest.approx(parts["total"]) and parts["total"] == pytest.approx(17.0)

    # Keras: no sanity check, epochs end after their validation; an epoch without validation.
    keras = {"fit_start": 2.0, "epochs": [{"train_start": 2.0, "train_end": 6.0}], "fit_end": 6.5}
    parts = split_job(keras, launch=0.0, exit_=7.0)
    assert (parts["sanity"], parts["first_val"], parts["between"]) == pytest.approx((0, 0, 0.5))
    assert parts["first_train"] == pytest.approx(4.0)

    stamps["epochs"][1]["val_start"] = 14.0  # before its epoch started: refused, not reported
    with pytest.raises(ValueError, match="not in order"):
        split_job(stamps, launch=1.0, exit_=18.0)


def test_seed_job_report_gives_keras_over_tlfinetune():
    from bench_job import COLUMNS, job_markdown

    def row(setup, precision, scale):
        r = {k: scale for k, _ in COLUMNS}
        r.update(setup=setup, precision=precision, in_fit=4 * scale, first_ips=25.5 / scale)
        ours = setup == "tlfinetune"
        r.update(bound=25.5 if ours else float("nan"), load=1.0)
        r.update(bound_fused=30.6 if ours else float("nan"))
        return r

    rows = [row("tlfinetune", "bf16-mixed", 1.0), row("Keras (TensorFlow)", "float32", 20.0)]
    rows[1]["data_load"] = 3.0
    text = job_markdown(
        {
            "config": {"data": "d", "epochs": 10},
            "command": "c",
            "machine": "m",
            "rows": rows,
            "notes": ["n"],
        }
    )
    assert "| tlfinetune | bf16-mixed | 1.00 | 1.00 |" in text  # start-up, sanity check, ...
    # first epoch img/s over the bound: the plain forward's, then tlfinetune's fused one
    assert "| 25.5 | 1.00× (25.5) | 0.83× (30.6) |" in text
    assert "| float32 | bf16-mixed | 20.0× | 20.0× | 20.0× | 20.0× |" in text
    assert "loading the arrays: float32 3.0 s" in text


def test_bench_job_flag_picks_the_seed_job_and_rejects_others(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--job", "seed", "--help"])
    assert exc.value.code == 0
    assert "--precisions" in capsys.readouterr().out
    for args, word in ((["--job=seed", "--precisions=bf16-mixed,64-true"], "64-true"),
                       (["--job", "nightly"], "nightly")):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            main([*args, f"--output={tmp_path / 'x.md'}"])
        assert exc.value.code == 2
        assert word in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
