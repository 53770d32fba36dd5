"""End-to-end tests: the notebooks headless, the pipeline, resume, evaluation and the Hub round trip."""
