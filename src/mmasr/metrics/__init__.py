"""Evaluation metrics shared by the stages: WER/CER, bootstrap intervals, retrieval, calibration."""
