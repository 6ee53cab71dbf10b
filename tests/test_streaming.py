"""predictions.csv and the reports stream: nothing kept per image, every image counted once."""

import csv
import tracemalloc
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tlfinetune.predict import PredictionWriter
from tlfinetune.report import EvaluationReport, Mistake, _Collector


class TableModel(pl.LightningModule):
    """Class probabilities from a table, row = the image's index in its first pixel."""

    def __init__(self, logits: torch.Tensor, class_names: list[str]) -> None:
        super().__init__()
        self.save_hyperparameters({"num_classes": logits.shape[1], "class_names": class_names})
        self.register_buffer("table", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]

    def predict_step(self, batch, batch_idx):
        return torch.softmax(self(batch[0]).float(), dim=1)

    def test_step(self, batch, batch_idx):
        self(batch[0])


class Files(pl.LightningDataModule):
    """``n`` images whose first pixel is their index, named like user files (one with a comma)."""

    def __init__(self, n: int, batch_size: int = 4) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size
        self.predict_files = [Path(f"photos/img {i:03d}.jpg") for i in range(n)]
        self.predict_files[3] = Path('photos/odd, "quoted" name.jpg')

    def _images(self) -> torch.Tensor:
        images = torch.zeros(self.n, 3, 4, 4, dtype=torch.int64)
        images[:, 0, 0, 0] = torch.arange(self.n)
        return images

    def predict_dataloader(self):
        dataset = TensorDataset(self._images(), torch.arange(self.n))
        return DataLoader(dataset, batch_size=self.batch_size)


def expected_csv(probs: torch.Tensor, names: list[str], files: list[Path], k: int) -> list[list]:
    """The rows the all-in-memory writer wrote: one per image, sorted, top-k by probability."""
    header = ["path", "label", "probability"]
    for i in range(1, k + 1):
        header += [f"top{i}", f"top{i}_probability"]
    rows = [header]
    for index, p in enumerate(probs):
        top = torch.topk(p, k)
        row = [str(files[index]), names[top.indices[0]], f"{top.values[0]:.6f}"]
        for value, cls in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row += [names[cls], f"{value:.6f}"]
        rows.append(row)
    return rows


@pytest.mark.parametrize("num_classes,top_k", [(12, 5), (3, 5)])
def test_streamed_predictions_equal_the_direct_computation(tmp_path, num_classes, top_k):
    n = 23  # several batches, the last one short
    logits = torch.randn(n, num_classes, generator=torch.Generator().manual_seed(1)) * 4
    names = [f"class {i}" for i in range(num_classes)]
    out = tmp_path / "out" / "predictions.csv"
    writer = PredictionWriter(output=str(out), top_k=top_k)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    data = Files(n)
    trainer.predict(TableModel(logits, names), data, return_predictions=False)

    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    probs = torch.softmax(logits.float(), dim=1)
    assert rows == expected_csv(probs, names, data.predict_files, min(top_k, num_classes))
    assert out.read_bytes().count(b"\r\n") == n + 1  # csv's line ends, as before
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.csv"]  # parts removed


def retained(obj, seen=None) -> int:
    """Numbers held by ``obj``: tensor elements, list/dict entries, recursively."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel()
    if isinstance(obj, (list, tuple, set)):
        return len(obj) + sum(retained(v, seen) for v in obj)
    if isinstance(obj, dict):
        return len(obj) + sum(retained(v, seen) for v in obj.values())
    if isinstance(obj, (Mistake, _Collector, PredictionWriter, EvaluationReport)):
        return retained(vars(obj), seen)
    return 0


def test_writer_state_does_not_grow_with_the_number_of_images(tmp_path):
    classes, batch = 1000, 32
    names = [f"c{i}" for i in range(classes)]
    model = TableModel(torch.zeros(1, classes), names)
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    writer = PredictionWriter(top_k=5)
    writer.on_predict_epoch_start(trainer, model)
    sizes, memory = [], []
    tracemalloc.start()
    try:
        for i in range(60):
            probs = torch.softmax(torch.randn(batch, classes), dim=1)
            ids = list(range(i * batch, (i + 1) * batch))
            writer.write_on_batch_end(trainer, model, probs, ids, None, i)
            if i in (9, 59):
                sizes.append(retained(writer))
                memory.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    writer._close_part()
    assert sizes[0] == sizes[1]  # 320 images or 1,920: the same state
    # Python objects alive: the all-in-memory writer kept 1,600 more floats per 1,000 classes
    # per image here (about 50 MB); streaming keeps nothing.
    assert memory[1] - memory[0] < 200_000, memory
    lines = (tmp_path / ".predictions.csv.part0").read_text().splitlines()
    assert len(lines) == 60 * batch  # every row went to the part file as its batch finished


def test_report_state_does_not_grow_with_the_number_of_images():
    classes, batch, max_mistakes = 50, 16, 8
    collector = _Collector(max_mistakes, classes)
    g = torch.Generator().manual_seed(0)
    sizes = []
    for i in range(120):
        probs = torch.softmax(torch.randn(batch, classes, generator=g) * 3, dim=1)
        labels = torch.randint(0, classes, (batch,), generator=g)
        images = torch.randint(0, 255, (batch, 3, 8, 8), dtype=torch.uint8, generator=g)
        collector.update(probs, labels, images)
        if i in (19, 119):
            sizes.append(retained(collector))
    assert sizes[0] == sizes[1]  # 320 images or 1,920: confusion matrix + 8 mistakes
    assert len(collector.mistakes) == max_mistakes
    assert int(collector.counts.confusion.sum()) == 120 * batch


class FakeTrainer:
    """What the report and the datamodule read of a Trainer under DDP, for one rank."""

    def __init__(self, rank: int, loader=None, fn: str = "test") -> None:
        self.world_size, self.global_rank = 2, rank
        self.distributed_sampler_kwargs = {"num_replicas": 2, "rank": rank}
        self.state = type("State", (), {"fn": fn})()
        self.test_dataloaders = loader


def test_report_counts_a_padding_repeat_once():
    from torch.utils.data import DistributedSampler

    from tlfinetune.report import _not_padding

    dataset = TensorDataset(torch.arange(7))  # 7 images, 2 processes: one is repeated
    kept = []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=3, sampler=sampler)
        seen = 0
        for (batch,) in loader:
            mask = _not_padding(FakeTrainer(rank, loader), 0, seen, len(batch))
            seen += len(batch)
            kept += (batch if mask is None else batch[mask]).tolist()
    assert sorted(kept) == list(range(7))  # without the mask: image 0 twice


def test_validate_and_test_loaders_give_each_image_to_one_process():
    from tlfinetune.data import ImageDataModule

    images = torch.randint(0, 255, (9, 8, 8, 3), dtype=torch.uint8)
    labels = torch.arange(9) % 3
    dm = ImageDataModule.from_arrays(
        images, labels, images, labels, images[:7], labels[:7], image_size=8, batch_size=4,
        num_workers=0,
    )  # fmt: skip
    dm.setup("test")
    for fn, loader, n in (("test", "test_dataloader", 7), ("validate", "val_dataloader", 9)):
        seen = []
        for rank in (0, 1):
            dm.trainer = FakeTrainer(rank, fn=fn)
            seen += list(getattr(dm, loader)().sampler)
        assert sorted(seen) == list(range(n))  # each image once: no repeat to even out ranks
    dm.trainer = FakeTrainer(0, fn="fit")  # fit's validation: Lightning's padded sampler
    assert getattr(dm.val_dataloader(), "sampler", None).__class__.__name__ == "SequentialSampler"
