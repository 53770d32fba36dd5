"""Run settings and run folders: profile loading and validation (config), outputs/<run-id> (runs). Imports no other
medtune subpackage but io (config: :func:`medtune.io.sources.parse_source` for the profile's source strings)."""
