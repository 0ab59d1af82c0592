"""Core: configuration dataclasses (the only home of defaults), errors, the run folder, the runtime."""

VERSION = "0.1.0"  # tlkit.__version__; setup.cfg holds the same number (tests/test_dependencies.py)
