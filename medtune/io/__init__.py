"""Every call to the Hugging Face Hub, a Hub mirror or ModelScope (sources). Imports only medtune.settings."""
