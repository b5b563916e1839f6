"""churn: many short TCP connections with mixed endings, every side of every
connection life held against the tracer's records.

Generator: server processes, each listening on 127.0.0.1 and ::1 with a
thread per connection, and client processes, each making its share of the
connections one after the other to a server and family drawn at random
(seeded).  Every connection starts with a 16-byte header from the client
saying how it ends and how many bytes go each way:

  normal      client sends, server replies, client closes, server reads EOF
  half_close  client sends and shuts down its write side; the server reads
              to EOF, replies, closes; the client reads to EOF
  server_rst  the server reads part of the request, resets (SO_LINGER 0)
              with the rest unread
  late_read   the server replies and resets; the client reads the reply
              (half the time only after its socket reached TCP_CLOSE)
  client_rst  the client resets once the server acknowledged the header;
              the server reads the request only after TCP_CLOSE
  reuse       two late_read lives from one fixed client port to one server
              port: one 4-tuple, two lives, no poll needed in between

Each process writes its ground truth as JSON into a directory: one entry
per side (pid, family, addresses, ports, bytes sent and received as its
own send()/recv() calls returned them), per life.

As a library: check(col, n) runs n connection lives while polling the
Collector every 0.5 s, compares, prints
    churn: tried N exact E wrong W missing M spurious S
and asserts wrong == missing == spurious == 0 (E and W count sides, S
records that match no side).  As a script (what the processes run):
    churn.py server OUTDIR
    churn.py client OUTDIR SEED COUNT SERVERS_JSON
"""

import json
import os
import random
import select
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.abspath(__file__)
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
ADDR = {4: "127.0.0.1", 6: "::1"}
TCP_CLOSE = 7
HEADER = struct.Struct("<4sIII")  # kind, client bytes after the header, reply, server reads
KINDS = {b"norm": "normal", b"half": "half_close", b"srst": "server_rst",
         b"late": "late_read", b"crst": "client_rst"}
CODES = dict((v, k) for k, v in KINDS.items())
# how often each ending is drawn
WEIGHTS = [("normal", 30), ("half_close", 20), ("server_rst", 10), ("late_read", 15),
           ("client_rst", 10), ("reuse", 15)]
TIMEOUT = 30.0


class Side(object):
    """One end of a connection as its process saw it."""

    def __init__(self, sock, family, kind):
        sock.settimeout(TIMEOUT)
        self.sock, self.family, self.kind = sock, family, kind
        self.laddr, self.lport = sock.getsockname()[:2]
        self.raddr, self.rport = sock.getpeername()[:2]
        self.sent = self.recv = 0

    def send(self, data):
        self.sock.sendall(data)
        self.sent += len(data)

    def recv_exact(self, n):
        data = []
        while n:
            chunk = self.sock.recv(min(n, 65536))
            if not chunk:
                raise EOFError("EOF with %d bytes still expected" % n)
            self.recv += len(chunk)
            n -= len(chunk)
            data.append(chunk)
        return b"".join(data)

    def recv_to_end(self):
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return
            if not chunk:
                return
            self.recv += len(chunk)

    def wait_closed(self):
        """Until the kernel moved the socket to TCP_CLOSE."""
        deadline = time.time() + TIMEOUT
        while self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != TCP_CLOSE:
            if time.time() > deadline:
                raise RuntimeError("never reached TCP_CLOSE")
            time.sleep(0.001)

    def linger0(self):
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def truth(self, life=0):
        return {"pid": os.getpid(), "family": self.family, "laddr": self.laddr,
                "lport": self.lport, "raddr": self.raddr, "rport": self.rport,
                "sent": self.sent, "recv": self.recv, "kind": self.kind, "life": life}


def _write(outdir, role, obj):
    path = os.path.join(outdir, "%s-%d.json" % (role, os.getpid()))
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.rename(path + ".tmp", path)


# ---------------------------------------------------------------------------
# server process

def _serve_one(sock, family, sides, errors, lock):
    s = None
    try:
        s = Side(sock, family, "?")
        kind, a, b, r = HEADER.unpack(s.recv_exact(HEADER.size))
        s.kind = KINDS[kind]
        if s.kind == "normal":
            s.recv_exact(a)
            s.send(b"s" * b)
            s.recv_to_end()
        elif s.kind == "half_close":
            s.recv_to_end()
            s.send(b"s" * b)
        elif s.kind == "server_rst":
            s.recv_exact(r)   # a - r bytes stay unread
            s.linger0()
        elif s.kind == "late_read":
            s.recv_exact(a)
            s.send(b"s" * b)
            s.linger0()
        elif s.kind == "client_rst":
            s.send(b"k")      # the client resets once it has this
            s.wait_closed()
            s.recv_to_end()   # the whole request, read after the reset
        s.sock.close()
        with lock:
            sides.append(s.truth())
    except Exception as e:
        with lock:
            errors.append("server %s: %r" % (s.kind if s else "?", e))


def serve(outdir):
    lsts = {}
    sel = selectors.DefaultSelector()
    for family in (4, 6):
        l = socket.socket(AF[family])
        l.bind((ADDR[family], 0))
        l.listen(1024)
        lsts[family] = l
        sel.register(l, selectors.EVENT_READ, family)
    sys.stdout.write(json.dumps({"pid": os.getpid(), "ports": dict(
        (str(f), l.getsockname()[1]) for f, l in lsts.items())}) + "\n")
    sys.stdout.flush()
    stop = threading.Event()

    def watch_stdin():  # the test closes our stdin when the clients are done
        sys.stdin.read()
        stop.set()
    t = threading.Thread(target=watch_stdin)
    t.daemon = True
    t.start()
    sides, errors, lock, workers = [], [], threading.Lock(), []
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            sock, _ = key.fileobj.accept()
            w = threading.Thread(target=_serve_one, args=(sock, key.data, sides, errors, lock))
            w.daemon = True
            w.start()
            workers.append(w)
        if len(workers) > 256:
            workers = [w for w in workers if w.is_alive()]
    deadline = time.time() + TIMEOUT
    for w in workers:
        w.join(max(0.1, deadline - time.time()))
    stuck = sum(1 for w in workers if w.is_alive())
    if stuck:
        errors.append("%d server threads never finished" % stuck)
    with lock:
        _write(outdir, "server", {"pid": os.getpid(), "sides": list(sides), "errors": list(errors)})


# ---------------------------------------------------------------------------
# client process

def _connect(family, port, bind_port=None):
    s = socket.socket(AF[family])
    if bind_port is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ADDR[family], bind_port))
    s.settimeout(TIMEOUT)
    s.connect((ADDR[family], port))
    return s


def _one(rng, kind, family, port, bind_port=None):
    """One connection life, client side; returns its Side."""
    a, b = rng.randint(1, 20000), rng.randint(1, 20000)
    r = rng.randint(0, a - 1)
    c = Side(_connect(family, port, bind_port), family, kind)
    c.send(HEADER.pack(CODES[kind], a, b, r) + b"c" * a)
    if kind == "normal":
        c.recv_exact(b)
    elif kind == "half_close":
        c.sock.shutdown(socket.SHUT_WR)
        c.recv_to_end()
    elif kind == "server_rst":
        c.recv_to_end()       # ECONNRESET
    elif kind == "late_read":
        if bind_port is not None or rng.random() < 0.5:
            c.wait_closed()   # the RST arrived: the reply is read after TCP_CLOSE
        c.recv_to_end()
    elif kind == "client_rst":
        c.recv_exact(1)
        c.linger0()
    c.sock.close()
    return c


def client(outdir, seed, count, servers):
    rng = random.Random(seed)
    kinds = [k for k, w in WEIGHTS for _ in range(w)]
    sides, errors, tried = [], [], 0
    while tried < count:
        kind = rng.choice(kinds)
        family = rng.choice((4, 6))
        port = rng.choice(servers)["ports"][str(family)]
        try:
            if kind == "reuse" and count - tried >= 2:
                tried += 2
                first = _one(rng, "late_read", family, port, bind_port=0)
                sides.append(first.truth(life=0))
                # first was reset by the server and closed: its port is free again
                again = _one(rng, "late_read", family, port, bind_port=first.lport)
                sides.append(again.truth(life=1))
                if (again.lport, again.rport) != (first.lport, first.rport):
                    errors.append("reuse did not reuse the tuple")
            else:
                tried += 1
                kind = "normal" if kind == "reuse" else kind
                sides.append(_one(rng, kind, family, port).truth())
        except Exception as e:
            errors.append("client %s v%d: %r" % (kind, family, e))
    _write(outdir, "client", {"pid": os.getpid(), "tried": tried, "sides": sides,
                              "errors": errors})


# ---------------------------------------------------------------------------
# the checker

def _where(pid, family, laddr, lport, raddr, rport):
    return (pid, family, laddr, lport, raddr, rport)


def compare(sides, records):
    """Counts of sides matched exactly (one closed record with the side's
    bytes), sides with a record that differs, sides with no record, and
    records that match no side; and a few examples of each problem."""
    want, got = {}, {}
    for s in sides:
        want.setdefault(_where(s["pid"], s["family"], s["laddr"], s["lport"], s["raddr"],
                               s["rport"]), []).append(s)
    for c in records:
        got.setdefault(_where(c.pid, c.family, c.laddr, c.lport, c.raddr, c.rport), []).append(c)
    exact = wrong = missing = spurious = 0
    examples = []
    for where in set(want) | set(got):
        exp, rest = list(want.get(where, [])), []
        for c in got.get(where, []):
            match = [s for s in exp if c.state == "closed" and
                     (s["sent"], s["recv"]) == (c.sent_bytes, c.recv_bytes)]
            if match:
                exp.remove(match[0])
                exact += 1
            else:
                rest.append(c)
        paired = min(len(exp), len(rest))
        wrong += paired
        missing += len(exp) - paired
        spurious += len(rest) - paired
        if exp or rest:
            examples.append("  pid %d v%d %s:%d -> %s:%d expected %s, tracer %s" % (
                where + (["%s sent %d recv %d (life %d)" % (s["kind"], s["sent"], s["recv"], s["life"])
                          for s in exp],
                         ["sent %d recv %d %s" % (c.sent_bytes, c.recv_bytes, c.state)
                          for c in rest])))
    return {"exact": exact, "wrong": wrong, "missing": missing, "spurious": spurious,
            "examples": sorted(examples)}


def _first_line(p, timeout):
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        raise AssertionError("churn server %d did not start in %.0f s" % (p.pid, timeout))
    return json.loads(p.stdout.readline())


def run(col, n, clients=4, servers=2, seed=1, poll_every=0.5, timeout=120.0):
    """Run the churn while polling col; returns (ground truth, tried, errors)."""
    outdir = tempfile.mkdtemp(prefix="churn-")
    procs = []
    try:
        srv = []
        for _ in range(servers):
            p = subprocess.Popen([sys.executable, HERE, "server", outdir], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, universal_newlines=True)
            procs.append(p)
            srv.append(_first_line(p, timeout))
        cli = []
        for i in range(clients):
            count = n // clients + (1 if i < n % clients else 0)
            cli.append(subprocess.Popen([sys.executable, HERE, "client", outdir,
                                         str(seed * 1000 + i), str(count), json.dumps(srv)]))
        procs.extend(cli)
        deadline = time.time() + timeout
        while any(p.poll() is None for p in cli):
            col.poll()  # short connections must be reported all the same
            if time.time() > deadline:
                raise AssertionError("churn clients still running after %.0f s" % timeout)
            time.sleep(poll_every)
        for p in procs[:servers]:
            p.stdin.close()
        while any(p.poll() is None for p in procs[:servers]):
            col.poll()
            if time.time() > deadline + TIMEOUT:
                raise AssertionError("churn servers did not finish")
            time.sleep(0.1)
        bad = [p.returncode for p in procs if p.returncode != 0]
        assert not bad, "churn processes failed: exit codes %r (stderr above)" % bad
        truth = []
        for name in sorted(os.listdir(outdir)):
            with open(os.path.join(outdir, name)) as f:
                truth.append(json.load(f))
        assert len(truth) == clients + servers, "ground truth files: %r" % os.listdir(outdir)
        return truth
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout):
                if f is not None and not f.closed:
                    f.close()
        shutil.rmtree(outdir, ignore_errors=True)


def check(col, n=3000, clients=4, servers=2, seed=1, settle=5.0, timeout=120.0):
    """n connection lives of mixed endings, several client processes, both
    IP versions: every side exactly one closed record with its bytes, no
    other TCP record of these processes."""
    start = time.time()
    truth = run(col, n, clients, servers, seed, timeout=timeout)
    pids = set(t["pid"] for t in truth)
    sides = [s for t in truth for s in t["sides"]]
    errors = [e for t in truth for e in t["errors"]]
    tried = sum(t.get("tried", 0) for t in truth)
    assert not errors, "churn traffic itself failed (a test problem, not the tracer's): %r" % (
        errors[:20],)
    assert tried == n
    deadline = time.time() + settle
    while True:  # the last closes may still be on their way
        col.poll()
        records = [c for c in col.latest.values() if c.pid in pids and c.proto == "tcp"]
        res = compare(sides, records)
        if res["exact"] == len(sides) and not res["spurious"] or time.time() > deadline:
            break
        time.sleep(0.2)
    line = "churn: tried %d exact %d wrong %d missing %d spurious %d" % (
        tried, res["exact"], res["wrong"], res["missing"], res["spurious"])
    print("%s (%d sides, %d clients, %d servers, %.1f s)" % (
        line, len(sides), clients, servers, time.time() - start))
    assert res["wrong"] == res["missing"] == res["spurious"] == 0, "%s\n%s" % (
        line, "\n".join(res["examples"][:30]))
    assert res["exact"] == len(sides)
    return res


def main(argv):
    if argv[0] == "server":
        serve(argv[1])
    else:
        client(argv[1], int(argv[2]), int(argv[3]), json.loads(argv[4]))


if __name__ == "__main__":
    main(sys.argv[1:])
