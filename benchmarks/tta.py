"""Does flip test-time augmentation help? Plain vs ``--prediction.tta flip`` for one checkpoint.

Usage: ``python benchmarks/tta.py CHECKPOINT [--root demo]``. Prints, for the val and test splits
of ``--root``, the accuracy of the plain forward pass and of the flip average, and how many images
the average fixed and broke. The same model and batches for both: only the forward pass differs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tlfinetune import ImageDataModule, TransferClassifier


def main() -> None:
    """Compare plain and flip-TTA accuracy of a checkpoint on a dataset's val and test splits."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--root", default="demo")
    args = parser.parse_args()
    model = TransferClassifier.load_from_checkpoint(
        args.checkpoint, map_location="cpu", weights_only=True
    ).eval()
    data = ImageDataModule(root=args.root, image_size=model.hparams.image_size, batch_size=64,
                           num_workers=0, augment=False)  # fmt: skip
    data.setup("fit")
    data.setup("test")
    for split, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
        labels, plain, flip = [], [], []
        with torch.no_grad():
            for images, y in loader:
                labels.append(y)
                plain.append(F.softmax(model(images), 1).argmax(1))
                model.tta = "flip"
                flip.append(F.softmax(model(images), 1).argmax(1))
                model.tta = "none"
        y, p, t = torch.cat(labels), torch.cat(plain), torch.cat(flip)
        fixed, broken = int(((p != y) & (t == y)).sum()), int(((p == y) & (t != y)).sum())
        print(
            f"{split}: {len(y)} images, accuracy plain {(p == y).float().mean():.4f}, "
            f"flip TTA {(t == y).float().mean():.4f} (fixed {fixed}, broke {broken})"
        )


if __name__ == "__main__":
    main()
