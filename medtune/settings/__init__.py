"""Run settings and run folders: profile loading and validation (config), outputs/<run-id> (runs). Imports no other medtune subpackage."""
