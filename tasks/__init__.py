"""The Lightning tasks, importable only as ``refvision.tasks``.

This folder is the source of the ``refvision.tasks`` package (the distribution maps it there).
Imported under any other name -- ``import tasks`` from the repository root -- its classes would
exist twice and ``isinstance`` checks would fail, so that is refused.
"""

if __name__ != "refvision.tasks":
    raise ImportError(f"the tasks are the package refvision.tasks; import them from there, not as {__name__!r}")
