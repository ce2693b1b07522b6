"""Benchmarks: each script measures a baseline and hftextgen's path in the same run and reports
the ratio (`python -m bench.<name> --help`; `make bench` runs the CPU ones)."""
