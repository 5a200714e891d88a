"""The container image tier (``./dev test-image``): not part of ``./dev test``."""
