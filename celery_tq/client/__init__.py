"""Client side: what happens when a task is sent.

``publish`` is the one publish hook (metadata, broker priority, time limits, kwargsrepr),
``batch`` sends a task and its ``task-sent`` event in one round trip, ``watched_sent`` leaves that
event out while no monitor listens (Redis, RabbitMQ with confirms), ``limits`` refuses a message
too large or with ids a store cannot hold before anything is sent.
"""
