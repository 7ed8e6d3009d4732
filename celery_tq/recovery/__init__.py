"""Tasks lost in the broker (``celery tq lost``): ``scan`` reads which task ids the broker still
holds (queues, unacked and processing lists, the embedded broker's table); ``lost`` finds records
``QUEUED`` with no message left and re-sends or marks them."""
