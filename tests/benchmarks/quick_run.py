"""The check every benchmark's quick-run test shares: `--quick --out DIR` writes its rows, the run's metadata and
the ceilings it measured to DIR/<name>.json, and a plot to DIR/<name>.png where matplotlib is installed."""

import importlib.util
import json

META_FIELDS = ("device", "device_type", "torch_version", "triton_version", "python_version", "date", "git_commit")


def run_quick(main, name, out, ceilings):
    """The result rows of main(["--quick", "--out", out]), once its report is checked; `ceilings` name the meta
    fields that hold the ceilings measured, each positive."""
    results = main(["--quick", "--out", str(out)])

    report = json.loads((out / f"{name}.json").read_text())
    assert all(field in report["meta"] for field in META_FIELDS), report["meta"]
    assert all(report["meta"][ceiling] > 0 for ceiling in ceilings), report["meta"]
    assert report["results"] == results
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / f"{name}.png").stat().st_size > 0
    return results
