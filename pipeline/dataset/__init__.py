"""Messages → conversations → cleaned, redacted training samples."""
