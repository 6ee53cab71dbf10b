"""Export a trained TransferClassifier as a self-contained ONNX or ``torch.export`` (.pt2) file.

The exported model takes a float32 image batch (N, 3, H, W) with values in [0, 1], RGB, at the
size the model was trained at, and returns class probabilities (N, num_classes). Normalisation
(the weights' mean/std) and the softmax are inside the exported graph; the batch dimension N is
dynamic. Nothing of tlfinetune is needed to run it: ``onnxruntime`` for ``.onnx``,
``torch.export.load(path).module()`` for ``.pt2``.

Next to the model file, ``<file>.json`` (``model.onnx`` -> ``model.onnx.json``) describes it:
class names in output order, input shape and value range, the preprocessing ``predict`` applies
before the model (how image files are decoded, the shorter-side resize with its interpolation and
antialiasing, the centre crop), mean/std (for information; they are already applied inside),
backbone, and what the output means. README's "Deploy an exported model" reproduces ``predict``'s
probabilities from it with onnxruntime.

ONNX goes through the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``);
the legacy TorchScript-based exporter is only a fallback when that fails. After writing, the file
is loaded back and run at batch sizes 1 and 3; its output must match the PyTorch model's.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from torch import nn

from tlfinetune.errors import ConfigError, TLFinetuneError
from tlfinetune.transforms import Preprocessing

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "pt2"]
FORMATS: tuple[str, ...] = ("onnx", "pt2")
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
PARITY_ATOL = 1e-4
LEGACY_OPSET = 18  # only for the fallback exporter; the dynamo exporter picks its own
_EXTRA = "pip install 'tlfinetune[export]'"


class ExportError(TLFinetuneError):
    """The model cannot be exported as asked: output path, missing package, failed check."""


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    path: Path
    sidecar: Path
    format: str
    exporter: str
    metadata: dict[str, Any] = field(default_factory=dict)


class ProbabilityModel(nn.Module):
    """Wraps a classifier returning logits: float images in [0, 1] -> softmax probabilities."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> (N, num_classes) probabilities."""
        return torch.softmax(self.classifier(images).float(), dim=1)


def sidecar_path(output: str | os.PathLike[str]) -> Path:
    """The JSON description next to an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    output = Path(output)
    return output.with_name(output.name + ".json")


def export(
    model: nn.Module,
    output: str | os.PathLike[str],
    format: ExportFormat | None = None,
    *,
    overwrite: bool = False,
    check: bool = True,
) -> ExportResult:
    """Write ``model`` as a file that maps float images in [0, 1] to class probabilities.

    The model is copied to the CPU in float32 and contiguous memory layout before export; the
    model passed in is left untouched.

    Args:
        model: a :class:`~tlfinetune.module.TransferClassifier` with its head built.
        output: file to write. Its sidecar ``<output>.json`` is written next to it.
        format: ``onnx`` or ``pt2`` (``torch.export``); taken from the file suffix when left out.
        overwrite: replace ``output`` and its sidecar when they exist (refused otherwise).
        check: load the written file back and compare its output with the model's at batch
            sizes 1 and 3 (ONNX: with onnxruntime, skipped with a warning when not installed).

    Returns:
        Where the files went, which exporter wrote the model, and the sidecar's content.

    Raises:
        ConfigError: the format is unknown, or the model has no head yet.
        ExportError: the output exists, its folder cannot be written, the ONNX packages are
            missing, the export failed, or the exported model does not match the original.
    """
    output = Path(output)
    fmt = _resolve_format(output, format)
    _prepare_output(output, overwrite)
    if fmt == "onnx":
        _require_onnx()
    wrapper, example = _prepare_model(model)
    # Written under its final name in a private folder next to it, checked, then moved into
    # place: a failed export leaves no half-written file and keeps an older one.
    with tempfile.TemporaryDirectory(prefix=".tlfinetune-export-", dir=output.parent) as tmp:
        staged = Path(tmp) / output.name
        with torch.no_grad():
            if fmt == "onnx":
                exporter, opset = _export_onnx(wrapper, example, staged)
            else:
                exporter, opset = _export_pt2(wrapper, example, staged), None
            if check:
                _check_parity(wrapper, example, staged, fmt)
        os.replace(staged, output)
    metadata = describe_export(model, fmt, output, exporter, opset)
    sidecar = sidecar_path(output)
    sidecar.write_text(json.dumps(metadata, indent=2) + "\n")
    log.info(f"Exported {fmt} model to {output} ({exporter}); description in {sidecar}.")
    return ExportResult(output, sidecar, fmt, exporter, metadata)


# --- checks before exporting -------------------------------------------------------------------


def _resolve_format(output: Path, format: str | None) -> str:
    fmt = format if format is not None else output.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        how = f"format={format!r}" if format is not None else f"the suffix of {output}"
        raise ConfigError(
            f"Cannot tell the export format from {how}: choose one of {', '.join(FORMATS)} "
            f"(ONNX for onnxruntime and other runtimes, pt2 for torch.export.load)."
        )
    return fmt


def _prepare_output(output: Path, overwrite: bool) -> None:
    sidecar = sidecar_path(output)
    existing = [p for p in (output, sidecar) if p.exists()]
    if existing and not overwrite:
        raise ExportError(
            f"{existing[0]} already exists; refusing to overwrite it. Choose another output "
            f"file or pass overwrite=True (--overwrite on the command line)."
        )
    if output.is_dir():
        raise ExportError(f"{output} is a folder; give the path of the file to write.")
    folder = output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"Cannot create the output folder {folder}: {err}.") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"The output folder {folder} is not writable; choose another output.")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _require_onnx() -> None:
    if not _installed("onnx"):
        raise ExportError(
            f"ONNX export needs the onnx package (and onnxscript, onnxruntime to export and check "
            f"it), which is not installed: {_EXTRA}."
        )


def _prepare_model(model: nn.Module) -> tuple[ProbabilityModel, torch.Tensor]:
    hparams = getattr(model, "hparams", {})
    if getattr(model, "head", True) is None or hparams.get("image_size") is None:
        raise ConfigError(
            "The model has no head yet (num_classes and image_size unknown): export a model "
            "loaded from a checkpoint, or one built with num_classes and image_size."
        )
    # A private copy: CPU, float32, contiguous layout (channels-last buys nothing in an exported
    # graph and trips torch.export.save), no autograd. Exporting under no_grad also keeps the
    # frozen-prefix no_grad branch of TransferClassifier.features out of the graph.
    clone = copy.deepcopy(model).cpu().float().eval()
    clone.to(memory_format=torch.contiguous_format)
    if "channels_last" in hparams:
        clone.hparams.channels_last = False
    clone.requires_grad_(False)
    size = int(hparams["image_size"])
    # Batch 2, not 1: an example of size 1 would let torch.export specialise the batch to 1.
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return ProbabilityModel(clone).eval(), example


# --- exporters ---------------------------------------------------------------------------------


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1)


def _export_pt2(wrapper: nn.Module, example: torch.Tensor, output: Path) -> str:
    try:
        program = torch.export.export(
            wrapper, (example,), dynamic_shapes={INPUT_NAME: {0: _batch_dim()}}
        )
        torch.export.save(program, output)
    except OSError as err:
        raise ExportError(f"Cannot write {output}: {err}.") from err
    except Exception as err:
        raise ExportError(f"torch.export could not export the model: {err}") from err
    return f"torch.export (torch {torch.__version__})"


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, output: Path) -> tuple[str, int | None]:
    """Export with the dynamo exporter, else the legacy one; return (exporter, opset)."""
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    first_error: Exception | None = None
    if _installed("onnxscript"):
        try:
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                dynamic_shapes={INPUT_NAME: {0: _batch_dim()}},
                verbose=False,
                **names,
            )
            program.save(str(output))
            opset = program.model.opset_imports.get("")
            return f"torch.onnx.export dynamo=True (torch {torch.__version__})", opset
        except OSError as err:
            raise ExportError(f"Cannot write {output}: {err}.") from err
        except Exception as err:  # the exporter raises many types; the legacy one may still work
            first_error = err
            log.warning(
                f"The torch.export-based ONNX exporter failed ({type(err).__name__}: {err}); "
                f"falling back to the legacy TorchScript-based exporter."
            )
    else:
        log.warning(f"onnxscript is not installed ({_EXTRA}): using the legacy ONNX exporter.")
    # In inference, nn.MultiheadAttention (ViT) takes a fused fast path whose operator the
    # legacy exporter cannot translate; the unfused path computes the same attention.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():  # its deprecation notice: the log line above says it
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper,
                (example,),
                str(output),
                dynamo=False,
                opset_version=LEGACY_OPSET,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                **names,
            )
    except OSError as err:
        raise ExportError(f"Cannot write {output}: {err}.") from err
    except Exception as err:
        before = f" (the dynamo exporter failed first: {first_error})" if first_error else ""
        raise ExportError(f"ONNX export failed: {err}{before}") from err
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return f"torch.onnx.export dynamo=False, legacy (torch {torch.__version__})", LEGACY_OPSET


# --- parity check ------------------------------------------------------------------------------


def _check_parity(wrapper: nn.Module, example: torch.Tensor, output: Path, fmt: str) -> None:
    run = _onnx_runner(output) if fmt == "onnx" else _pt2_runner(output)
    if run is None:
        return
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # 1 and an odd size: the batch dimension must be dynamic
        x = torch.rand(batch, *example.shape[1:], generator=g)
        expected = wrapper(x)
        try:
            got = run(x)
        except Exception as err:
            raise ExportError(
                f"The exported {output.name} does not run at batch size {batch}: {err}"
            ) from err
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=PARITY_ATOL):
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else "n/a"
            raise ExportError(
                f"The exported {output.name} does not reproduce the model at batch size {batch}: "
                f"shape {tuple(got.shape)} vs {tuple(expected.shape)}, max difference {diff}."
            )


def _onnx_runner(output: Path) -> Any:
    if not _installed("onnxruntime"):
        log.warning(f"onnxruntime is not installed ({_EXTRA}): {output} was not checked.")
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _pt2_runner(output: Path) -> Any:
    module = torch.export.load(output).module()
    return lambda x: module(x)


# --- sidecar -----------------------------------------------------------------------------------


def describe_export(
    model: nn.Module, fmt: str, output: Path, exporter: str, opset: int | None = None
) -> dict[str, Any]:
    """The sidecar's content: what goes in, what comes out, and where the model came from."""
    hparams = getattr(model, "hparams", {})
    num_classes = int(hparams["num_classes"])
    names = hparams.get("class_names")
    size = int(hparams["image_size"])
    mean = getattr(model, "mean", None)
    std = getattr(model, "std", None)
    preset = getattr(model, "preprocessing", None)
    return {
        "file": output.name,
        "format": fmt,
        "exporter": exporter,
        **({"opset": opset} if fmt == "onnx" else {}),
        "tlfinetune_version": _version("tlfinetune"),
        "torch_version": torch.__version__,
        "backbone": hparams.get("backbone"),
        "num_classes": num_classes,
        "class_names": [str(n) for n in names] if names else [str(i) for i in range(num_classes)],
        "input": {
            "name": INPUT_NAME,
            "shape": ["N", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "value_range": [0.0, 1.0],
            "dynamic_axes": {"0": "batch"},
        },
        "input_size": [3, size, size],
        "value_range": [0.0, 1.0],
        **({"preprocessing": describe_preprocessing(preset)} if preset is not None else {}),
        "normalization": {
            "mean": [round(v, 6) for v in mean.flatten().tolist()] if mean is not None else None,
            "std": [round(v, 6) for v in std.flatten().tolist()] if std is not None else None,
            "applied_inside_model": True,
            "note": "For information: (x - mean) / std is part of the exported model.",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["N", num_classes],
            "dtype": "float32",
            "meaning": "Softmax class probabilities; column i is class_names[i]; rows sum to 1.",
        },
    }


def describe_preprocessing(preset: Preprocessing) -> dict[str, Any]:
    """What ``predict`` does to an image file before the model: enough to reproduce it."""
    crop, resize = preset.crop_size, preset.resize_size
    return {
        "decode": {
            "mode": "RGB, 8 bits per channel, rotated upright per the EXIF orientation tag",
            "jpeg_draft": [2 * crop, 2 * crop],
            "note": "JPEG files are decoded at a reduced scale when both sides are at least twice "
            "jpeg_draft (Pillow: image.draft('RGB', jpeg_draft) before loading).",
        },
        "resize_size": resize,
        "resize_edge": "shorter",
        "interpolation": preset.interpolation,
        "antialias": preset.antialias,
        "crop_size": crop,
        "crop": "center",
        "steps": [
            f"resize the shorter side to {resize} px ({preset.interpolation}, "
            f"{'antialiased' if preset.antialias else 'no antialiasing'}); the longer side to "
            f"int({resize} * longer / shorter)",
            f"crop the central {crop} x {crop} (offsets round((side - {crop}) / 2))",
            "uint8 -> float32 / 255, NCHW; mean/std are applied inside the model",
        ],
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- command line ------------------------------------------------------------------------------


def export_parser() -> ArgumentParser:
    """The arguments of ``tlfinetune export``: typed, so jsonargparse validates them."""
    parser = ArgumentParser(
        prog="tlfinetune export",
        description="Export a checkpoint as a self-contained model: float images (N, 3, H, W) in "
        "[0, 1] -> class probabilities, with a JSON description next to it (<output>.json).",
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML file of these")
    parser.add_argument(
        "--ckpt_path", type=Path, required=True, help="checkpoint to export (.ckpt)"
    )
    parser.add_argument(
        "--output",
        type=Path | None,
        help="file to write; default: the checkpoint's path with the format's suffix",
    )
    parser.add_argument(
        "--format",
        type=ExportFormat | None,
        help="default: from --output's suffix, else onnx",
    )
    parser.add_argument(
        "--overwrite", action=ActionYesNo, default=False, help="replace an existing output"
    )
    parser.add_argument(
        "--check",
        action=ActionYesNo(yes_prefix="", no_prefix="no_"),
        default=True,
        help="run the exported file to compare its outputs with the model's (--no_check skips)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``tlfinetune export --ckpt_path CKPT [--output FILE] [--format onnx|pt2] [--overwrite]``."""
    from tlfinetune.cli import prog_name, short_errors

    parser = export_parser()
    parser.prog = f"{prog_name()} export"
    short_errors(parser, None if argv is None else list(argv))  # the error, not 40 lines of usage
    args = parser.parse_args(None if argv is None else list(argv))
    fmt = args.format or (args.output.suffix.lstrip(".") if args.output else "onnx")
    output = args.output or args.ckpt_path.with_suffix(f".{fmt}")
    result = export(
        load_checkpoint(args.ckpt_path), output, fmt, overwrite=args.overwrite, check=args.check
    )
    print(f"{result.path}\n{result.sidecar}")


def load_checkpoint(path: str | os.PathLike[str]) -> nn.Module:
    """A TransferClassifier from a Lightning checkpoint, on the CPU, safe unpickler only."""
    from tlfinetune.cli import read_checkpoint
    from tlfinetune.module import TransferClassifier

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ckpt_path {path}: no such checkpoint file.")
    try:
        return TransferClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except TLFinetuneError:
        raise
    except Exception as err:
        read_checkpoint(path)  # not a Lightning checkpoint at all: said as fit and test say it
        raise ConfigError(
            f"--ckpt_path {path} cannot be loaded as a TransferClassifier checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})."
        ) from None
