"""Peak dense FLOP/s per device and dtype: the denominator of MFU, with a source for every row.

Why not Lightning's ``lightning.fabric.utilities.throughput.get_available_flops``? Checked against lightning 2.6.6:
it lists some parts at their *sparse* tensor-core rate (H200 bf16 at 2.0e15, twice the dense 989 TFLOP/s, so MFU
reads half of the truth), has no Blackwell or AMD Instinct rows, and matches device names by substring. Here the
figures are dense, matching is by whole words (``"a10"`` never matches an A100), and a user table can add or
correct rows (``SpeedMonitor(peak_flops_table=...)``).

Datasheets often print tensor-core figures "with sparsity" (2x the dense figure, marked with an asterisk): those were
halved, because a training step runs dense matmuls. fp16/bf16/fp8 are the rates with FP32 accumulation (what PyTorch
uses); GeForce cards run that at half their FP16-accumulate rate. ``fp32`` is the non-tensor-core FP32 rate; ``tf32``
the TF32 tensor-core rate (absent where there is none, in which case lookups of ``tf32`` fall back to ``fp32``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch

__all__ = ["DTYPES", "PEAK_FLOPS", "SOURCES", "lookup_peak_flops", "precision_dtype", "tf32_enabled"]

#: The dtypes a peak table row may hold.
DTYPES: tuple[str, ...] = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8")

#: Peak dense FLOP/s of one device, by device-name words and dtype.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # Hopper. H100 SXM5 is reported as "NVIDIA H100 80GB HBM3"; H200 SXM as "NVIDIA H200".
    "h100": {"fp64": 67e12, "fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
    "h100 pcie": {"fp64": 51.2e12, "fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12, "fp8": 1513e12},
    # The 94 GB H100 NVL (one GPU, not the 2-GPU pair some older tables list).
    "h100 nvl": {"fp64": 60e12, "fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12},
    "h800": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
    "gh200": {"fp64": 67e12, "fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
    "h200": {"fp64": 67e12, "fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12},
    "h200 nvl": {"fp64": 60e12, "fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12},
    "h20": {"fp32": 44e12, "tf32": 74e12, "bf16": 148e12, "fp16": 148e12, "fp8": 296e12},
    # Blackwell: HGX B200 figures per GPU.
    "b200": {"fp64": 37e12, "fp32": 75e12, "tf32": 1125e12, "bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12},
    # Grace Blackwell: GB200 NVL72 rack figures per GPU (reported as "NVIDIA GB200"; whole words keep b200 apart).
    "gb200": {"fp64": 40e12, "fp32": 80e12, "tf32": 1250e12, "bf16": 2500e12, "fp16": 2500e12, "fp8": 5000e12},
    # Ampere (A100 SXM4 and PCIe have the same rates).
    "a100": {"fp64": 19.5e12, "fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    "a30": {"fp64": 10.3e12, "fp32": 10.3e12, "tf32": 82e12, "bf16": 165e12, "fp16": 165e12},
    "a40": {"fp32": 37.4e12, "tf32": 74.8e12, "bf16": 149.7e12, "fp16": 149.7e12},
    "a10": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    # AWS publishes no tensor-core figures for the A10G; these are the A10's (override if you measured otherwise).
    "a10g": {"fp32": 31.2e12, "tf32": 62.5e12, "bf16": 125e12, "fp16": 125e12},
    "a6000": {"fp32": 38.7e12, "tf32": 77.4e12, "bf16": 154.8e12, "fp16": 154.8e12},
    "rtx 3090": {"fp32": 35.6e12, "tf32": 35.6e12, "bf16": 71e12, "fp16": 71e12},
    "rtx 3090 ti": {"fp32": 40e12, "tf32": 40e12, "bf16": 80e12, "fp16": 80e12},
    # Ada
    "l4": {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12, "fp8": 242.5e12},
    "l40": {"fp32": 90.5e12, "tf32": 90.5e12, "bf16": 181e12, "fp16": 181e12, "fp8": 362e12},
    "l40s": {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362.05e12, "fp16": 362.05e12, "fp8": 733e12},
    "rtx 4090": {"fp32": 82.6e12, "tf32": 82.6e12, "bf16": 165.2e12, "fp16": 165.2e12, "fp8": 330.3e12},
    "rtx 4080": {"fp32": 48.7e12, "tf32": 48.7e12, "bf16": 97.5e12, "fp16": 97.5e12, "fp8": 194.9e12},
    # Volta and Turing: no bf16 or tf32 tensor cores; "fp16" is the tensor-core rate.
    "v100": {"fp64": 7.8e12, "fp32": 15.7e12, "fp16": 125e12},
    "v100 pcie": {"fp64": 7e12, "fp32": 14e12, "fp16": 112e12},
    "v100s": {"fp64": 8.2e12, "fp32": 16.4e12, "fp16": 130e12},
    "t4": {"fp32": 8.1e12, "fp16": 65e12},
    # AMD Instinct (ROCm builds report these names through torch.cuda.get_device_name).
    "mi300x": {"fp64": 163.4e12, "fp32": 163.4e12, "tf32": 653.7e12, "bf16": 1307.4e12, "fp16": 1307.4e12,
               "fp8": 2614.9e12},
    "mi325x": {"fp64": 163.4e12, "fp32": 163.4e12, "tf32": 653.7e12, "bf16": 1307.4e12, "fp16": 1307.4e12,
               "fp8": 2614.9e12},
    "mi250x": {"fp64": 95.7e12, "fp32": 95.7e12, "bf16": 383e12, "fp16": 383e12},
    "mi250": {"fp64": 90.5e12, "fp32": 90.5e12, "bf16": 362.1e12, "fp16": 362.1e12},
}  # fmt: skip

#: Where each row of :data:`PEAK_FLOPS` comes from (the vendor document, and the column used).
SOURCES: dict[str, str] = {
    "h100": "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (sparse figures halved)",
    "h100 pcie": "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column (sparse figures halved)",
    "h100 nvl": "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column, per GPU (sparse figures halved)",
    "h800": "NVIDIA H800 SXM5 product specifications (compute identical to H100 SXM; sparse figures halved)",
    "gh200": "NVIDIA GH200 Grace Hopper Superchip datasheet, the Hopper GPU (sparse figures halved)",
    "h200": "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (sparse figures halved)",
    "h200 nvl": "NVIDIA H200 Tensor Core GPU datasheet, H200 NVL column (sparse figures halved)",
    "h20": "NVIDIA HGX H20 product specifications (dense figures as published)",
    "b200": "NVIDIA HGX B200 datasheet, per GPU = system figure / 8 (sparse figures halved)",
    "gb200": "NVIDIA GB200 NVL72 datasheet, per GPU = rack figure / 72 (sparse figures halved)",
    "a100": "NVIDIA A100 Tensor Core GPU datasheet (SXM4 and PCIe share these rates; sparse figures halved)",
    "a30": "NVIDIA A30 Tensor Core GPU datasheet (sparse figures halved)",
    "a40": "NVIDIA A40 datasheet (sparse figures halved)",
    "a10": "NVIDIA A10 Tensor Core GPU datasheet (sparse figures halved)",
    "a10g": "AWS publishes no tensor-core figures for the A10G (EC2 G5); the NVIDIA A10 datasheet's are used",
    "a6000": "NVIDIA RTX A6000 datasheet (sparse figures halved)",
    "rtx 3090": "NVIDIA Ampere GA102 GPU architecture whitepaper, RTX 3090, FP32 accumulate",
    "rtx 3090 ti": "NVIDIA GeForce RTX 3090 Ti specifications and the GA102 whitepaper ratios, FP32 accumulate",
    "l4": "NVIDIA L4 Tensor Core GPU datasheet (sparse figures halved)",
    "l40": "NVIDIA L40 GPU datasheet (sparse figures halved)",
    "l40s": "NVIDIA L40S GPU datasheet (sparse figures halved)",
    "rtx 4090": "NVIDIA Ada Lovelace GPU architecture whitepaper, RTX 4090, FP32 accumulate",
    "rtx 4080": "NVIDIA Ada Lovelace GPU architecture whitepaper, RTX 4080, FP32 accumulate",
    "v100": "NVIDIA Tesla V100 datasheet, SXM2 column (fp16 = tensor-core rate)",
    "v100 pcie": "NVIDIA Tesla V100 datasheet, PCIe column (fp16 = tensor-core rate)",
    "v100s": "NVIDIA Tesla V100S PCIe datasheet (fp16 = tensor-core rate)",
    "t4": "NVIDIA T4 Tensor Core GPU datasheet (fp16 = tensor-core rate)",
    "mi300x": "AMD Instinct MI300X accelerator datasheet (dense matrix figures)",
    "mi325x": "AMD Instinct MI325X accelerator datasheet (dense matrix figures)",
    "mi250x": "AMD Instinct MI250X accelerator datasheet (packed FP32/matrix figures)",
    "mi250": "AMD Instinct MI250 accelerator datasheet (packed FP32/matrix figures)",
}


def _tokens(name: str) -> tuple[str, ...]:
    """Lower-case alphanumeric words: ``"NVIDIA A100-SXM4-80GB"`` -> ``("nvidia", "a100", "sxm4", "80gb")``."""
    return tuple(re.findall(r"[a-z0-9]+", name.lower()))


def _best_row(device_name: str, table: Mapping[str, Mapping[str, float]]) -> str | None:
    """The table key whose words all appear as whole words in ``device_name``; the most specific (most words, then
    longest) wins, so ``"NVIDIA H100 PCIe"`` picks ``"h100 pcie"`` over ``"h100"``. Whole words keep ``"a10"`` from
    matching an A100 and ``"h200"`` from matching a GH200."""
    words = set(_tokens(device_name))
    best: tuple[int, int, str] | None = None
    for key in table:
        key_words = _tokens(key)
        if key_words and words.issuperset(key_words):
            rank = (len(key_words), len(key), key)
            if best is None or rank[:2] > best[:2]:
                best = rank
    return best[2] if best is not None else None


def lookup_peak_flops(
    device_name: str, dtype: str | None, table: Mapping[str, Mapping[str, float]] | None = None
) -> float | None:
    """Peak dense FLOP/s of one device for ``dtype``, or ``None`` if unknown.

    Args:
        device_name: As ``torch.cuda.get_device_name()`` reports it, e.g. ``"NVIDIA H100 80GB HBM3"``.
        dtype: One of ``"fp64"``, ``"fp32"``, ``"tf32"``, ``"bf16"``, ``"fp16"``, ``"fp8"`` (see
            :func:`precision_dtype`). ``"tf32"`` falls back to ``"fp32"`` on a device without TF32 tensor cores.
        table: Extra rows in the format of :data:`PEAK_FLOPS`, searched first (a match there that has ``dtype`` wins
            over the built-in table even when a built-in key is more specific).

    Returns:
        FLOP/s, or ``None`` when no row matches the name or the row has no entry for ``dtype``.
    """
    if dtype is None:
        return None
    for source in (table or {}, PEAK_FLOPS):
        key = _best_row(device_name, source)
        if key is None:
            continue
        row = source[key]
        value = row.get(dtype)
        if value is None and dtype == "tf32":
            value = row.get("fp32")
        if value is not None:
            return float(value)
    return None


def tf32_enabled() -> bool:
    """Whether float32 matmuls on CUDA may run in TF32 (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.set_float32_matmul_precision("high"|"medium")`` or the newer ``fp32_precision = "tf32"``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch versions deprecate one spelling or the other
        try:
            if getattr(torch.backends.cuda.matmul, "fp32_precision", None) == "tf32":
                return True
            return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
        except Exception:
            return False


def precision_dtype(precision: str | int | None, tf32: bool = False) -> str | None:
    """The matmul dtype a Lightning ``precision`` setting computes in (the column of the peak table to use).

    ``"bf16-mixed"``/``"bf16-true"`` -> ``"bf16"``; ``"16-mixed"``/``"16-true"`` -> ``"fp16"``; ``"32-true"`` ->
    ``"fp32"``, or ``"tf32"`` when ``tf32``; ``"64-true"`` -> ``"fp64"``; ``"transformer-engine*"`` -> ``"fp8"``;
    anything else (e.g. bitsandbytes) -> ``None``.
    """
    text = str(precision).lower()
    if "transformer-engine" in text or "fp8" in text:
        return "fp8"
    if text.startswith("bf16"):
        return "bf16"
    if text.startswith("16"):
        return "fp16"
    if text.startswith("32"):
        return "tf32" if tf32 else "fp32"
    if text.startswith("64"):
        return "fp64"
    return None
