"""The durable job queue and the workers' waiting for it.

- :mod:`dicomnode.jobs.queue`: jobs in the database: enqueue, claim by kind priority, leases,
  completion, failures retried with backoff, dead letters, postponement, retries, orphaned
  leases released, waiting jobs hastened, when the next job is due.
- :mod:`dicomnode.jobs.waiting`: :class:`~dicomnode.jobs.waiting.JobSignal`, which tells idle
  worker threads that a job may be runnable (PostgreSQL ``LISTEN``/``NOTIFY``; on SQLite a
  datagram, with the file's ``data_version`` as a fallback).
- :mod:`dicomnode.jobs.wakeups`: on SQLite, the Unix datagram sockets of the waiting workers,
  and the wake-up sent to each by whoever queues a job.
- :mod:`dicomnode.jobs.dead_letters`: dead-lettered jobs listed and retried (the REST API and
  ``dicomnode jobs``).
"""
