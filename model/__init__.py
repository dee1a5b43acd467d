"""The MML model: one small module per equation of the paper."""
