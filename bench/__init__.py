"""Development benchmarks run from the repository root (not installed): `python -m bench.NAME`, or the
shell wrappers next to these modules. Peers' re-implementations live here, never in the package."""
