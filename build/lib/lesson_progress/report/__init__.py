"""``lesson-progress report``: a course's analytics as one self-contained HTML file.

:mod:`.figures` reads the figures through the public API, :mod:`.render` draws them (needs
the ``report`` extra), :mod:`.command` is the command line.
"""
