"""The application: the ``refvision`` command and the demo."""
