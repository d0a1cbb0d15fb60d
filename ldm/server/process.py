"""Run the server in a child process on a free loopback port (for tests, the load test and the screenshot).

    with ServerProcess(["--api-auth", "me:pw"]) as server:
        requests.get(server.url + "/sdapi/v1/options", auth=("me", "pw"))

The child is ``python -m ldm.cli.serve --port 0 ...``: it binds a free port itself and logs it, so no
port can be taken between choosing and binding it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

_SERVING = re.compile(r"serving on (http://[\w.\[\]:-]+:\d+)")


class ServerProcess:
    """A server child process; ``url`` once started; ``log`` holds its stderr lines."""

    def __init__(self, arguments: list[str] = (), *, start_timeout: float = 180) -> None:
        self.command = [sys.executable, "-m", "ldm.cli.serve", "--port", "0", *arguments]
        self.start_timeout = start_timeout
        self.log: list[str] = []
        self.url: str | None = None
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> None:
        """Start the child and wait until it answers HTTP; ``RuntimeError`` with its log if it does not."""
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.start_timeout
        for line in self.process.stderr:
            self.log.append(line)
            match = _SERVING.search(line)
            if match:
                self.url = match.group(1)
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        threading.Thread(target=self._keep_log, daemon=True).start()
        while not self._answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("the server does not answer:\n" + "".join(self.log))
            time.sleep(0.05)

    def _keep_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/sdapi/v1/options", timeout=5)
        except urllib.error.HTTPError:  # 401 without credentials: it answers
            return True
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
