"""traffic: loopback clients and servers in their own processes, with known sizes.

As a library: Pair(...) starts a server process, then a client process,
and collects what each reported (pid, addresses, ports) as JSON lines.
As a script (what those processes run):
    traffic.py server PROTO FAMILY ADDR RECV_SIZES REPLY_SIZES [--unconnected]
    traffic.py client PROTO FAMILY ADDR PORT SEND_SIZES REPLY_SIZES [--unconnected]
Sizes are comma-separated byte counts, one per send()/datagram.  Traffic
goes only to loopback addresses.
"""

import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}


def _say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def _sizes(text):
    return [int(x) for x in text.split(",") if x]


def _recv_exact(sock, n):
    got = 0
    while got < n:
        chunk = sock.recv(min(65536, n - got))
        if not chunk:
            raise EOFError("peer closed after %d of %d bytes" % (got, n))
        got += len(chunk)


def _wait_go():
    """Block until the parent writes a line (lets tests poll mid-way)."""
    sys.stdin.readline()


def serve(proto, family, addr, recv_sizes, reply_sizes, unconnected, hold):
    af = FAMILIES[family]
    if proto == "tcp":
        lst = socket.socket(af, socket.SOCK_STREAM)
        lst.bind((addr, 0))
        lst.listen(8)
        _say(pid=os.getpid(), port=lst.getsockname()[1])
        conn, peer = lst.accept()
        _recv_exact(conn, sum(recv_sizes))
        for n in reply_sizes:
            conn.sendall(b"s" * n)
        if hold:
            _say(state="holding")
            _wait_go()
        conn.recv(1)  # the client's close
        conn.close()
        lst.close()
        _say(peer_port=peer[1], done=True)
        return
    s = socket.socket(af, socket.SOCK_DGRAM)
    s.bind((addr, 0))
    _say(pid=os.getpid(), port=s.getsockname()[1])
    peer = None
    for n in recv_sizes:
        data, peer = s.recvfrom(65536)
        assert len(data) == n, (len(data), n)
    for n in reply_sizes:
        s.sendto(b"s" * n, peer)
    if hold:
        _say(state="holding")
        _wait_go()
    s.close()
    _say(peer_port=peer[1] if peer else 0, done=True)


def client(proto, family, addr, port, send_sizes, reply_sizes, unconnected, hold):
    af = FAMILIES[family]
    if proto == "tcp":
        s = socket.socket(af, socket.SOCK_STREAM)
        s.connect((addr, port))
        _say(pid=os.getpid(), lport=s.getsockname()[1], laddr=s.getsockname()[0])
        for n in send_sizes:
            s.sendall(b"c" * n)
        _recv_exact(s, sum(reply_sizes))
        if hold:
            _say(state="holding")
            _wait_go()
        s.close()
        _say(done=True)
        return
    s = socket.socket(af, socket.SOCK_DGRAM)
    s.bind((addr, 0))
    if not unconnected:
        s.connect((addr, port))
    _say(pid=os.getpid(), lport=s.getsockname()[1], laddr=s.getsockname()[0])
    for n in send_sizes:
        if unconnected:
            s.sendto(b"c" * n, (addr, port))
        else:
            s.send(b"c" * n)
    for n in reply_sizes:
        data = s.recvfrom(65536)[0] if unconnected else s.recv(65536)
        assert len(data) == n, (len(data), n)
    if hold:
        _say(state="holding")
        _wait_go()
    s.close()
    _say(done=True)


def _csv(sizes):
    return ",".join(str(n) for n in sizes)


class Pair(object):
    """A server and a client process exchanging known sizes over loopback.

    After start(): server_pid, server_port, client_pid, client_port, addr.
    hold=True: both stop before closing until release() is called.
    """

    def __init__(self, proto="tcp", family=4, send=(1000,), reply=(500,), unconnected=False,
                 hold=False, addr=None):
        self.proto, self.family = proto, family
        self.send, self.reply = list(send), list(reply)
        self.unconnected, self.hold = unconnected, hold
        self.addr = addr or LOOPBACK[family]
        self.procs = []

    def _spawn(self, *args):
        cmd = [sys.executable, os.path.join(HERE, "traffic.py")] + [str(a) for a in args]
        if self.unconnected:
            cmd.append("--unconnected")
        if self.hold:
            cmd.append("--hold")
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             universal_newlines=True)
        self.procs.append(p)
        return p

    @staticmethod
    def _read(p):
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("traffic process %d said nothing (exit %s)" % (p.pid, p.wait()))
        return json.loads(line)

    def start(self):
        self.server = self._spawn("server", self.proto, self.family, self.addr,
                                  _csv(self.send), _csv(self.reply))
        info = self._read(self.server)
        self.server_pid, self.server_port = info["pid"], info["port"]
        self.client = self._spawn("client", self.proto, self.family, self.addr, self.server_port,
                                  _csv(self.send), _csv(self.reply))
        info = self._read(self.client)
        self.client_pid, self.client_port = info["pid"], info["lport"]
        return self

    def wait_holding(self):
        for p in (self.client, self.server):
            assert self._read(p).get("state") == "holding"

    def release(self):
        for p in (self.client, self.server):
            try:
                p.stdin.write("go\n")
                p.stdin.flush()
            except (IOError, OSError):
                pass

    def wait(self, timeout=30):
        deadline = time.time() + timeout
        for p in self.procs:
            rest = max(0.1, deadline - time.time())
            try:
                p.wait(rest)
            except subprocess.TimeoutExpired:
                p.kill()
                raise RuntimeError("traffic process %d hung" % p.pid)
            if p.returncode != 0:
                raise RuntimeError("traffic process %d failed with %d" % (p.pid, p.returncode))
        for p in self.procs:
            p.stdout.close()
            p.stdin.close()
        return self

    def run(self):
        self.start()
        return self.wait()


def main(argv):
    role, proto, family, addr = argv[0], argv[1], int(argv[2]), argv[3]
    flags = [a for a in argv if a.startswith("--")]
    rest = [a for a in argv[4:] if not a.startswith("--")]
    unconnected, hold = "--unconnected" in flags, "--hold" in flags
    if role == "server":
        serve(proto, family, addr, _sizes(rest[0]), _sizes(rest[1]), unconnected, hold)
    else:
        client(proto, family, addr, int(rest[0]), _sizes(rest[1]), _sizes(rest[2]), unconnected, hold)


if __name__ == "__main__":
    main(sys.argv[1:])
