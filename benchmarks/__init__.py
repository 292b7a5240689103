"""Benchmarks of lmrt's ops against PyTorch: `python -m benchmarks.<name> --help`."""
