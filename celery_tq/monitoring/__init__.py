"""Monitoring: what ``celery tq status`` and the Prometheus exporter show.

``monitor`` reads queue depths per priority from the broker and the rest from the registry,
``status_view`` draws the live terminal view, ``exporter`` serves the metrics, and ``record_text``
formats records for ``tq tasks`` and ``tq show``.
"""
