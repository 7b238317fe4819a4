"""ember.eval: evaluation.

    classification.py   confusion matrix, accuracy, per-class precision / recall / F1, the matrix as a PNG
"""
