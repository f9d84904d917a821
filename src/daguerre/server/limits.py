"""The bounds of `daguerre serve`'s connections (server/http.py), apart from the work of one request
(daguerre.limits): kept in a module without imports so that the CLI's flags can show them."""

MAX_BODY_BYTES = 64 * 1024 * 1024  # a few init images of a few megapixels, base64
MAX_CONNECTIONS = 64  # open connections; a browser keeps about 6 per server
TIMEOUT = 30.0  # seconds for the idle wait and the head of a request, and the slack of a body
MIN_RATE = 64 * 1024  # bytes/s a body must at least move at (64 MB: about 17 minutes)
QUEUE_SIZE = 16  # generations waiting at once (the running one aside): server/jobs.py
