"""The test suite: unit/ (seconds, no model runs but tiny ones), pipeline/ (notebooks and end-to-end runs), llama4/."""
