"""The quick run of the whole benchmark suite, `lmrt bench --quick --out DIR`, made once per test session (in this
process) and read by the tests of tests/benchmarks; and the rule for its rows' statuses."""

import json
from types import SimpleNamespace

import pytest

from benchmarks import harness
from lmrt.cli import main

META_FIELDS = ("device", "device_type", "cpu_capability", "torch_version", "triton_version", "python_version", "date",
               "git_commit", "copy_bandwidth_gbps", "matmul_tflops", "providers", "pytorch_providers", "skipped")


@pytest.fixture(scope="session")
def quick_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick_suite")
    status = main(["bench", "--quick", "--out", str(out)])
    reports = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))}
    return SimpleNamespace(status=status, out=out, reports=reports)


def wrong_rows(rows):
    """The WRONG rows among `rows`, once every other row is checked to be ok, untimed (the Triton interpreter) or
    unsupported with its reason (an SDPA backend, or an lmrt backend, refusing a case it lacks)."""
    for row in rows:
        assert row["status"] in ("ok", "untimed", "unsupported", "WRONG"), row
        if row["status"] == "unsupported":
            assert row["provider"].startswith("sdpa-") or harness.LMRT_REFUSAL in row["error"], row
        if row["status"] == "untimed":
            assert row["provider"] == "lmrt-triton" and row["ms"] is None, row
    return [row for row in rows if row["status"] == "WRONG"]
