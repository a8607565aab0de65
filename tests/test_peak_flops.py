"""The MFU peak table (``callbacks/peak_flops.py``): every row has a source and sane dense figures."""

from __future__ import annotations

from lightning_cs336.callbacks.peak_flops import DTYPES, PEAK_FLOPS, SOURCES, lookup_peak_flops


def test_every_row_has_a_source() -> None:
    assert set(SOURCES) == set(PEAK_FLOPS)
    assert all(len(text) > 20 for text in SOURCES.values())


def test_rows_are_dense_and_ordered() -> None:
    for name, row in PEAK_FLOPS.items():
        assert set(row) <= set(DTYPES), name
        if "bf16" in row and "fp32" in row:
            assert row["bf16"] > row["fp32"], name  # tensor-core rates beat the plain FP32 rate
        if "fp8" in row and "bf16" in row:
            assert 1.9 < row["fp8"] / row["bf16"] < 2.1, name  # fp8 runs at twice the bf16 rate
    # Dense, not "with sparsity": the H100 SXM bf16 figure is 989 TFLOP/s, not 1979.
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert lookup_peak_flops("NVIDIA H200", "bf16") == 989.4e12


def test_unknown_device_is_none_not_a_guess() -> None:
    assert lookup_peak_flops("ACME Accelerator 9000", "bf16") is None
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB", None) is None


def test_covers_current_nvidia_and_amd_parts() -> None:
    """V100 through B200/GB200 and MI250 through MI325X, by the names torch reports, each with a dense bf16 (or, on
    Volta/Turing, fp16) figure; GB200 is its own row, not the B200's."""
    reported = {
        "Tesla V100-SXM2-32GB": ("fp16", 125e12),
        "NVIDIA A100-SXM4-80GB": ("bf16", 312e12),
        "NVIDIA H100 80GB HBM3": ("bf16", 989.4e12),
        "NVIDIA H200": ("bf16", 989.4e12),
        "NVIDIA B200": ("bf16", 2250e12),
        "NVIDIA GB200": ("bf16", 2500e12),
        "AMD Instinct MI250X": ("bf16", 383e12),
        "AMD Instinct MI250": ("bf16", 362.1e12),
        "AMD Instinct MI300X": ("bf16", 1307.4e12),
        "AMD Instinct MI325X": ("bf16", 1307.4e12),
    }
    for name, (dtype, value) in reported.items():
        assert lookup_peak_flops(name, dtype) == value, name
    assert lookup_peak_flops("NVIDIA GB200", "fp8") == 2 * lookup_peak_flops("NVIDIA GB200", "bf16")
