"""guestfwd bridge: QEMU's user-mode network runs this once per guest TCP connection, with the
connection on stdin/stdout, and it relays the bytes to and from a unix socket (nbdkit's).

Usage (inside a QEMU -netdev user,guestfwd=tcp:ADDR:PORT-cmd:... option):
    python3 -I -S bridge.py UNIX_SOCKET [LOG_FILE]

stdout (and, depending on the QEMU version, stderr) *is* the guest's TCP stream, so this program
never prints: diagnostics go to LOG_FILE, one line per event, appended:
    open PID
    close PID up=BYTES_GUEST_TO_SERVER down=BYTES_SERVER_TO_GUEST [error]
Standard library only; no network address is ever used, only the unix socket.
"""

import os
import socket
import sys
import threading


def main() -> None:
    path = sys.argv[1]
    logpath = sys.argv[2] if len(sys.argv) > 2 else None
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 2)  # a stray traceback must never reach the guest

    def log(line: str) -> None:
        if logpath:
            fd = os.open(logpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{line}\n".encode())
            finally:
                os.close(fd)

    pid = os.getpid()
    counts = {"up": 0, "down": 0}
    errors = []
    log(f"open {pid}")
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(path)
    except OSError as e:
        log(f"close {pid} up=0 down=0 connect-error={e}")
        return

    def guest_to_server() -> None:
        try:
            while True:
                data = os.read(0, 1 << 20)
                if not data:
                    break
                server.sendall(data)
                counts["up"] += len(data)
        except OSError as e:
            errors.append(f"up:{e.strerror}")
        try:
            server.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=guest_to_server, daemon=True)
    t.start()
    try:
        while True:
            data = server.recv(1 << 20)
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.write(1, view)
                view = view[n:]
            counts["down"] += len(data)
    except OSError as e:
        errors.append(f"down:{e.strerror}")
    # The server closed (or failed): the guest sees EOF when we exit.  Give the other direction a
    # moment to finish forwarding what the guest already sent.
    t.join(timeout=5)
    extra = (" " + ",".join(errors)) if errors else ""
    log(f"close {pid} up={counts['up']} down={counts['down']}{extra}")


if __name__ == "__main__":
    main()
    os._exit(0)
