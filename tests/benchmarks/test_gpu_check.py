import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from benchmarks import common

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_a_quick_benchmark_and_bundles_it(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--no-install", "--no-tests",
                           "--quick", "softmax"], capture_output=True, text=True, env=env, timeout=300)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(path.name for path in out.iterdir()) == ["benchmarks.log", "gpu_check.tar.gz", "summary.log"]
    summary = (out / "summary.log").read_text()
    assert "lmrt 0.1.0" in summary and "exit status 0" in summary
    with tarfile.open(out / "gpu_check.tar.gz") as bundle:
        names = {name.removeprefix("./") for name in bundle.getnames()}
    if "no CUDA GPU here" in summary:  # on a GPU machine the folder is the GPU's name
        folder = common.results_folder(torch.device("cpu"))
        assert {f"results/{folder}/bench_softmax.{kind}" for kind in ("json", "csv", "png")} <= names, names
    assert {"BENCHMARKS.md", "logs/benchmarks.log", "summary.log"} <= names, names
