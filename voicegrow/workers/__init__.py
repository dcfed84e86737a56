"""``WORKERS=N``: several server processes on one box, sharing the speaker and HTTP ports.

- :mod:`.listeners`: the parent binds the listening sockets (``SO_REUSEPORT``, one per worker) and
  the workers adopt them by file descriptor.
- :mod:`.supervisor`: the parent process — starts, restarts and stops the workers.
- :mod:`.control`: each worker's control socket and the fan-out over all of them, so that any worker
  answers ``/api/v1/sessions``, ``health/detail`` and admin actions for the whole box.
- :mod:`.context`: what a worker knows about its place in the box.
"""
