"""Model evaluation: metrics (pure), ground-truth readers, the ``models eval`` command."""
