"""Telling systemd how the daemon is doing: readiness, status, watchdog pings, stopping, reloading.

The protocol is one datagram of "KEY=VALUE" lines sent to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading
"@" means Linux's abstract namespace), as documented in sd_notify(3); the watchdog interval comes from
$WATCHDOG_USEC (for us if $WATCHDOG_PID is unset or our pid). It is written here rather than taken from a
library because it is those few lines: `systemd-python` needs libsystemd's headers to build, and the small
PyPI wrappers (e.g. `sdnotify`) do exactly this without the watchdog parsing. Without $NOTIFY_SOCKET (not under
systemd, `Type=` other than notify) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        environ = dict(os.environ if environ is None else environ)
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_usec = int(usec) if usec.isdigit() and int(usec) > 0 and mine else None
        self._last_status: str | None = None
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def ping_interval(self) -> float | None:
        """Seconds between watchdog pings: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # MSG_DONTWAIT: a receiver that does not read (its queue holds net.unix.max_dgram_qlen messages,
                # 10 by default) must not block the main loop; the message is dropped instead.
                sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError:  # systemd gone or the socket full: a notification is never worth failing or waiting for
            pass

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Ping if half the watchdog interval has passed. Call it from the main loop only, so a wedged loop
        stops pinging and systemd restarts the service (`Restart=on-failure`)."""
        interval = self.ping_interval
        if interval is not None and time.monotonic() - self._last_ping >= interval:
            self._last_ping = time.monotonic()
            self.send("WATCHDOG=1")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (253+) tell this reload apart from an earlier one; older ones ignore it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")
