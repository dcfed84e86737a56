"""The browser side of the HTTP port: the operator console at ``/``, the talk page at ``/talk``.

Static files are plain ES modules shipped in the package (no build step, no CDN); the routes that
serve them, the Content-Security-Policy and the talk page's WebSocket live in :mod:`voicegrow.http.web.routes`.
"""

from voicegrow.http.web.routes import is_public_path, make_web_blueprint

__all__ = ["is_public_path", "make_web_blueprint"]
