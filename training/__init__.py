"""Training side of mml-recall: data -> features -> three-stage meta-training -> export."""
