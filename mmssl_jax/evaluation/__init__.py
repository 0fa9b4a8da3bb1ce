"""Evaluators: zero-shot, linear probe, kNN, retrieval, SVM mAP."""
