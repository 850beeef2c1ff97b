"""A local S3 server for the tests: moto's, in a process of its own, with one test hook.

``python -m tests.s3_server`` listens on a free port of 127.0.0.1, prints
``s3-server: listening on http://127.0.0.1:PORT`` and serves until killed.  Its state is in
memory: killing it loses every bucket.

The hook, for failures in the middle of a save: ``POST /__pagewatch__/pause?after=N&match=S``
makes the server stop itself (``SIGSTOP``, the whole process) when the ``N``-th following
``PUT`` whose path contains ``S`` arrives, before it is handled: the ``N - 1`` before it are
stored, that one and every later request wait until the process gets ``SIGCONT``.  The
test sees the stop in ``/proc/PID/stat`` (state ``T``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import urllib.parse
from typing import Any


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    moto = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    plan: dict[str, Any] = {"after": 0, "match": None}

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/__pagewatch__/pause":
            q = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            with lock:
                plan["after"] = int(q["after"][0])
                plan["match"] = q.get("match", [""])[0]
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"armed\n"]
        if environ.get("REQUEST_METHOD") == "PUT" and plan["match"] is not None:
            with lock:
                hit = plan["match"] in path
                if hit:
                    plan["after"] -= 1
                    stop = plan["after"] == 0
                    if stop:
                        plan["match"] = None
            if hit and stop:
                os.kill(os.getpid(), signal.SIGSTOP)
        return moto(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(f"s3-server: listening on http://127.0.0.1:{server.server_port}", flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
