"""screen: run python3 tracer.py in a pseudo-terminal of a given size and
read back what a terminal shows (pyte emulates the terminal), plus a
"fleet" process with many loopback TCP connections of known sizes.

    with Terminal(80, 24, "--interval", "0.5", "--count", "4") as term:
        term.wait_for("Ctrl-C to end")
        ...
    frames = term.frames()   # the screen after each redraw, as lists of lines
"""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
import time

import pyte

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
END_OF_FRAME = b"\x1b[J"   # the live view ends each redraw by clearing the rest
ESCAPE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal(object):
    """python3 tracer.py ARGS with stdout and stderr on a pty of cols x rows."""

    def __init__(self, cols, rows, *args, **kw):
        self.cols, self.rows = cols, rows
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(os.environ)
        for k in ("COLUMNS", "LINES"):
            env.pop(k, None)
        env["TERM"] = "xterm"
        env.update(kw.get("env", {}))
        self.proc = subprocess.Popen([sys.executable, "tracer.py"] + [str(a) for a in args],
                                     cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                                     close_fds=True)
        os.close(slave)
        self.master = master
        self.raw = b""
        self.reader = threading.Thread(target=self._read)
        self.reader.daemon = True
        self.reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the other side is closed
                return
            if not data:
                return
            self.raw += data

    def wait_for(self, text, timeout=30.0):
        deadline = time.time() + timeout
        while text.encode() not in self.raw:
            if self.proc.poll() is not None:
                self.reader.join(2)
                assert text.encode() in self.raw, "tracer exited %d: %r" % (
                    self.proc.returncode, self.raw[-2000:])
                return
            assert time.time() < deadline, "no %r after %s s: %r" % (text, timeout, self.raw[-2000:])
            time.sleep(0.02)

    def wait_frames(self, n, timeout=30.0):
        deadline = time.time() + timeout
        while self.raw.count(END_OF_FRAME) < n:
            assert self.proc.poll() is None or self.raw.count(END_OF_FRAME) >= n, \
                "tracer exited %s after %d frames: %r" % (self.proc.returncode,
                                                           self.raw.count(END_OF_FRAME),
                                                           self.raw[-2000:])
            assert time.time() < deadline, "only %d frames" % self.raw.count(END_OF_FRAME)
            time.sleep(0.02)

    def finish(self, timeout=30.0):
        self.proc.wait(timeout)
        self.reader.join(5)
        return self.proc.returncode

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5)
        os.close(self.master)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def frames(self):
        """The screen after each redraw: a list of frames, each the list of
        the terminal's lines (trailing blanks stripped)."""
        screen = pyte.Screen(self.cols, self.rows)
        stream = pyte.ByteStream(screen)
        out = []
        for piece in self.raw.split(END_OF_FRAME)[:-1]:
            stream.feed(piece + END_OF_FRAME)
            out.append([l.rstrip() for l in screen.display])
        return out

    def printed_lines(self):
        """Every line the tracer wrote, escape sequences removed: a line
        longer than the terminal's width would have wrapped."""
        text = ESCAPE.sub(b"", self.raw).decode("utf-8", "replace")
        return [l.rstrip("\r") for l in text.split("\n")]


FLEET = r"""
import ctypes, json, socket, sys
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)   # PR_SET_NAME: the comm
n, addr = int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
lst = socket.socket(fam)
lst.bind((addr, 0))
lst.listen(n)
port = lst.getsockname()[1]
pairs = []
for i in range(n):
    c = socket.socket(fam)
    c.connect((addr, port))
    s, _ = lst.accept()
    pairs.append((c, s))
print(json.dumps({"pid": __import__("os").getpid(), "port": port,
                  "clients": [c.getsockname()[1] for c, _ in pairs]}), flush=True)
for line in sys.stdin:      # each line: send i*unit bytes on client i, the server reads them
    unit = int(line)
    for i, (c, s) in enumerate(pairs):
        c.sendall(b"x" * ((i + 1) * unit))
    for i, (c, s) in enumerate(pairs):
        got = 0
        while got < (i + 1) * unit:
            got += len(s.recv(1 << 20))
    print(json.dumps({"sent": unit}), flush=True)
"""


class Fleet(object):
    """A process named comm holding n loopback TCP connections to its own
    listener; send(unit) makes client i send (i + 1) * unit bytes, which
    the server side reads."""

    def __init__(self, comm, n, addr="127.0.0.1"):
        self.proc = subprocess.Popen([sys.executable, "-c", FLEET, comm, str(n), addr],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     universal_newlines=True)
        info = json.loads(self.proc.stdout.readline())
        self.pid, self.port, self.clients = info["pid"], info["port"], info["clients"]
        self.comm, self.n, self.addr = comm, n, addr

    def send(self, unit):
        self.proc.stdin.write("%d\n" % unit)
        self.proc.stdin.flush()
        assert json.loads(self.proc.stdout.readline()) == {"sent": unit}

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)
