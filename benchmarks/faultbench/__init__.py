"""The scenarios of ``benchmarks/faults.py``: each a function of a :class:`~.harness.Setup`
returning one row of the table (fault, measured figures, outcome, whether the requirement holds)."""
