import csv

import pytest

from benchmarks import common


@pytest.mark.parametrize("name,folder", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("Tesla T4", "t4"),
])
def test_device_folder(name, folder):
    assert common.device_folder("cuda", name) == folder
    assert common.device_folder("cpu", "Intel(R) Xeon(R) Processor") == "cpu"


def test_time_ratios_to_each_pytorch_provider():
    rows = [{"provider": "lmrt-cpp", "ms": 1.0}, {"provider": "torch", "ms": 2.0}, {"provider": "compile", "ms": None},
            {"provider": "naive", "ms": 4.0}]
    common.set_time_ratios(rows, ["torch", "compile"])
    assert [row.get("time_vs") for row in rows] == [{"torch": 0.5}, {"torch": 1.0}, None, {"torch": 2.0}]


def test_csv_flattens_ratios_and_shapes(tmp_path):
    rows = [{"provider": "a", "check_shape": [1, 2], "time_vs": {"torch": 0.5}, "ms": None},
            {"provider": "b", "check_shape": [3, 4], "time_vs": {}, "ms": 1.5}]
    common.write_csv(tmp_path / "rows.csv", rows)
    with (tmp_path / "rows.csv").open() as file:
        assert list(csv.DictReader(file)) == [
            {"provider": "a", "check_shape": "1x2", "time_vs_torch": "0.5", "ms": ""},
            {"provider": "b", "check_shape": "3x4", "time_vs_torch": "", "ms": "1.5"},
        ]
