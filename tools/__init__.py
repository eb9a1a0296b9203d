"""Command-line tools; each has main(argv=None) and is tested by calling it."""
