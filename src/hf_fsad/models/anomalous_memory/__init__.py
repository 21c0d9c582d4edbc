"""Anomalous memory on WinCLIP+ (Abdali et al., "Anomalous Samples for Few-Shot Anomaly Detection")."""
