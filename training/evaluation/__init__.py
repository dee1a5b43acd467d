"""Cold-start evaluation (paper Sec. 5): full-ranking metrics, the protocol every method goes
through, the baselines, ablations, significance tests and the generated results report."""
