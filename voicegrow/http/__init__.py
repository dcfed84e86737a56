"""Everything served on ``HTTP_PORT``: health, metrics, the admin API, the audio API, the xiaozhi OTA
endpoint, and the console and talk pages (``web/``).

HTTP reads the process-wide services and the live-session registry (``sessions/``); it never reaches
into a device driver (``streaming/``). Access policy that the WebSocket drivers share (``admin_auth``,
``auth_throttle``, ``forwarded``) stays at the top level, below both.
"""
