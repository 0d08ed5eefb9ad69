"""Development tools run from the repository root (not installed): mutation testing (tools/mutants),
fault injection (tools.faults, run by bench/faults), the Triton ahead-of-time compile check."""
