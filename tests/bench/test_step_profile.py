"""bench/step_profile.py: the GPU's busy time and the kernel kinds, read from a profiler trace."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bench.step_profile import busy_union, gpu_time_from_trace, kind_of


def test_busy_time_counts_overlapping_kernels_once() -> None:
    assert busy_union([]) == 0
    assert busy_union([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)  # [0, 3] and [5, 6]
    assert busy_union([(5, 6), (0, 10)]) == pytest.approx(10.0)  # one inside another, out of order


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("rows_bwd_kernel", "transform (fused Triton)"),
        ("mlp_param_grad_kernel", "transform (fused Triton)"),
        ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNN", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "matmul"),  # first match wins: sm90_
        ("void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata>", "optimizer"),
        ("triton_poi_fused_gelu_native_dropout_view_14", "inductor (fused elementwise / reductions)"),
        (
            "triton_per_fused__to_copy_add_native_dropout_native_layer_norm_view_15",
            "inductor (fused elementwise / reductions)",
        ),
        ("Memset (Device)", "copy / fill"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "copy / fill"),
        ("some_kernel", "other"),
    ],
)
def test_kernel_kinds(name: str, kind: str) -> None:
    assert kind_of(name) == kind


def test_gpu_time_from_a_chrome_trace(tmp_path: Path) -> None:
    events = [
        {"cat": "kernel", "name": "rows_fwd_kernel", "ts": 0.0, "dur": 10.0},
        {"cat": "kernel", "name": "rows_fwd_kernel", "ts": 20.0, "dur": 10.0},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 25.0, "dur": 10.0},  # overlaps the kernel before
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 100.0},  # host events do not count
        {"cat": "kernel", "name": "no duration", "ts": 50.0},
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    g = gpu_time_from_trace(path)
    assert g["n_gpu_events"] == 3
    assert g["busy_us"] == pytest.approx(25.0)  # 10 + [20, 35]
    assert g["span_us"] == pytest.approx(35.0)
    assert g["per_name"]["rows_fwd_kernel"] == (2, 20.0)
