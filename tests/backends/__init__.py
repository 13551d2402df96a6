"""Backend tests: ``conformance.py`` is the suite every backend passes; ``test_<kind>.py``
provides the ``backend`` and ``make_leftover`` fixtures and imports it."""
