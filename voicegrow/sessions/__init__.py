"""Live sessions, below the HTTP API and the server's lifecycle, above the per-connection drivers.

- :mod:`.registry`: this process's sessions (what shutdown walks, what admission counts).
- :mod:`.view`: the one interface the HTTP API asks (:class:`~.view.SessionView`): every live session,
  every worker's state, closing a session wherever it is held. Three implementations: this process
  alone (:class:`~.view.SessionView` itself), the box under ``WORKERS`` (:class:`voicegrow.workers.control.Box`,
  over Unix control sockets) and a cluster of replicas sharing Redis (:class:`~.cluster.ClusterView`).
"""
