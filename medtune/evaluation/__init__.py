"""Evaluation in 04 and 06: held-out answers, scores and loss (heldout); multiple-choice benchmarks
(multiple_choice)."""
