"""The SQL migrations, shipped inside the package as ``lesson_progress.migrations``.

pyproject.toml maps this directory into the package, so an installed wheel (or an editable
install) finds them with ``importlib.resources``; only the ``NNNN_name.sql`` files are read.
"""
