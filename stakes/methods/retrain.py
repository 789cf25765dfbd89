"""Deprecated location of the retrain oracle: it is a comparison job, not a method
(:func:`stakes.oracle.retrain_oracle`; ``stakes compare --retrain``)."""

from stakes.oracle import retrain_oracle  # noqa: F401

__all__ = ["retrain_oracle"]
