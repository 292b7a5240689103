"""The benchmarks' command lines refuse bad arguments as usage errors (exit status 2, one message naming the argument),
before anything is measured."""

import pytest

from benchmarks import bench_attention, bench_model, bench_softmax, suite


def _usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_unknown_benchmark_names_the_valid_ones(capsys):
    assert _usage_error(suite.main, ["softmax", "bogus"], capsys) == (
        "python -m benchmarks: error: argument NAME: invalid choice: 'bogus' (choose from attention, layer_norm, "
        "rms_norm, softmax, model)")


@pytest.mark.parametrize("main,option,value", [
    (bench_softmax.main, "--cols", "0"),
    (bench_softmax.main, "--rows", "-5"),
    (bench_softmax.main, "--rows", "many"),
    (bench_attention.main, "--seqlens", "0"),
    (bench_attention.main, "--head-dims", "-64"),
])
def test_grid_sizes_must_be_positive_integers(main, option, value, capsys):
    assert _usage_error(main, ["--quick", option, value], capsys).endswith(
        f"error: argument {option}: expected a positive integer, got {value!r}")


@pytest.mark.parametrize("main", [suite.main, bench_softmax.main, bench_model.main])
def test_an_out_folder_that_cannot_be_made_is_refused_first(main, capsys):
    assert _usage_error(main, ["--quick", "--out", "/dev/null/x"], capsys).endswith(
        "error: argument --out: cannot create the folder '/dev/null/x': Not a directory")


def test_out_folder_is_made_before_the_run(tmp_path, monkeypatch):
    def no_run(names, quick, out, *rest):
        assert out.is_dir()
        return 0

    monkeypatch.setattr(suite, "run", no_run)
    assert suite.main(["--quick", "--out", str(tmp_path / "new" / "results")]) == 0


def test_run_refuses_an_out_folder_that_cannot_be_made_before_measuring(monkeypatch):
    # `lmrt bench --out DIR` calls run directly, without the parser's check.
    monkeypatch.setattr(suite.common, "measure_ceilings", lambda *args: pytest.fail("measured before checking --out"))
    with pytest.raises(OSError, match="cannot create the output folder '/dev/null/x': Not a directory"):
        suite.run(["softmax"], quick=True, out="/dev/null/x")
