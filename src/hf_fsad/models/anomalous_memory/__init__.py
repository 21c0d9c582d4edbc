"""Anomalous-memory multi-score method (papers/anomalous-samples-fsad.txt), built on WinCLIP+."""
