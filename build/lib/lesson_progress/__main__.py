"""``python -m lesson_progress`` runs the ``lesson-progress`` command."""

from __future__ import annotations

import sys

from lesson_progress.cli import main

sys.exit(main())
