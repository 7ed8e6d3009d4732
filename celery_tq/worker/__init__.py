"""Worker side: the bootsteps and the request class that ``install(app)`` adds to a worker.

``events`` (task events in batches, without publisher confirms), ``watched_events`` (task events
only while a monitor listens), ``prefetch`` (prefetch bound for priorities), ``guard`` (startup
checks of the worker's broker), ``request`` (a lost pool process re-runs soon, a poison task ends
``WorkerLost``), ``timeouts`` (``timeout=`` on every pool), ``refused`` (messages no worker can read
end ``REJECTED``), ``handoff`` (pool processes hand outcomes to the main process, which writes
them in batches and acks after the write).
"""
