"""tlfinetune: adapt a pretrained VGG image classifier to your own images.

Data flow, one module per box::

    image folder -> data.ImageDataModule -> module.TransferClassifier(backbone + head)
                                          <- freeze.FreezeSchedule
                 -> lightning Trainer -> checkpoint -> predict / export / report

Inside the datamodule: sources (or arrays) find and split the images, scan checks them, datasets
decode them, transforms resize them, sampling orders them; machine says how many workers.
"""

import logging as _logging

from lightning.fabric.utilities.rank_zero import rank_zero_only

from tlfinetune.data import ImageDataModule
from tlfinetune.errors import ConfigError, DataError, TLFinetuneError, WeightsError
from tlfinetune.freeze import FreezeSchedule
from tlfinetune.machine import fastest_precision
from tlfinetune.module import TransferClassifier
from tlfinetune.transforms import Preprocessing


def _from_rank_zero(record: _logging.LogRecord) -> bool:
    """Under DDP every process logs the same lines: print them once (errors from any process)."""
    return record.levelno >= _logging.ERROR or getattr(rank_zero_only, "rank", 0) == 0


# Like Lightning does for its own logger: show our INFO lines, once per run, unless the
# application configured logging itself.
_log = _logging.getLogger(__name__)
_log.setLevel(_logging.INFO)
if not _log.handlers and not _logging.root.handlers:
    _handler = _logging.StreamHandler()
    _handler.addFilter(_from_rank_zero)
    _log.addHandler(_handler)
    _log.propagate = False

__all__ = [
    "ConfigError",
    "DataError",
    "FreezeSchedule",
    "ImageDataModule",
    "Preprocessing",
    "TLFinetuneError",
    "TransferClassifier",
    "WeightsError",
    "fastest_precision",
]
