"""Runs people read and compare: the run's manifest, its HTML report, the index of runs, and run against run.

- :mod:`~medtune.reports.manifest`: ``manifest.json`` of a run (code, versions, hardware, data fingerprint, seeds,
  profile hash, start/end times, status), written by the pipeline.
- :mod:`~medtune.reports.notebooks`: executed notebooks tidied (each progress bar once) and exported to HTML.
- :mod:`~medtune.reports.tables`: what the pages show, as plain data (metric rows, settings, answers, runs).
- :mod:`~medtune.reports.render`: a run's ``index.html`` and ``outputs/index.html`` (Jinja2 templates).
- :mod:`~medtune.reports.compare`: two runs side by side (Markdown and HTML).

``python -m medtune.reports report|index|compare ...`` (``make report``, ``make compare``).
"""
