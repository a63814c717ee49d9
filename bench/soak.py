#!/usr/bin/python3
"""tproxyd soak test with faults (issue 12).

Mixed traffic from the LAN namespace through tproxyd (TPROXY, its own
nftables rules; remote A through SOCKS5 to dante, remote B direct by a
rule) to servers in the WAN namespace, for MINUTES, while faults are
injected on a schedule:

- dante is killed and, a few seconds later, started again;
- tproxyd's rules are removed (`tproxyd rules remove -c CFG`) and, a few
  seconds later, applied again (`tproxyd rules apply -c CFG`);
- SIGHUP is sent (reload is not supported yet: tproxyd logs it and must
  carry on; this is not a fault window, flows across it must succeed).

Traffic (each connection or UDP socket is one "flow", logged by the client):

- dl: HTTP-like downloads of known content (64 KiB to 1 MiB), SHA-256 checked;
- bulk: every 20 s a burst of two 32 MiB downloads and one 16 MiB upload;
- short: many short connections (one 64-byte-ish request and answer);
- dns: DNS-like UDP query/answer to port 53, a new socket per query, retried;
- echo: a UDP socket doing 20 echo exchanges of 100-1200 bytes.

Every answer names the peer the server saw, so a flow that came the wrong
way (not through dante for remote A, not from the router for remote B)
fails too.

Judged at the end: every flow that did not overlap a fault window got all
its bytes right; flows that did may be cut (reset, closed, lost), never
corrupted and never hung past their timeout; tproxyd's descriptors and
RSS came back near their start after the final idle period; tproxyd did
not panic or die and exited 0 on SIGTERM; its nft table and ip rule are
gone after it stops; the namespaces are gone after the bed is taken down.

Roles of this one file: the orchestrator (default), `serve` (run in the
WAN namespace), `client` (run in the LAN namespace). Run it through
scripts/soak, which builds tproxyd.
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, TPROXYD, BenchError, Netns, log, max_nofile, proc_status, run  # noqa: E402

TCP_PORT = 8080
DNS_PORT = 53
ECHO_PORT = 7007
# Download payloads: name -> size; the content is random.Random(name) bytes.
PAYLOADS = {"s64k": 64 << 10, "s256k": 256 << 10, "s1m": 1 << 20, "b32m": 32 << 20, "u16m": 16 << 20}
DL_NAMES = ["s64k", "s256k", "s1m"]
# A TCP flow with no progress for this long is a hang (a failure always).
TCP_STALL = 15.0
# UDP: an answer must come within this, one try and this many retries.
UDP_WAIT = 1.0
UDP_RETRIES = 2
# A flow overlapping [fault start - BEFORE, fault end + AFTER] may be cut.
BEFORE, AFTER = 0.5, 2.0
DANTE_DOWN = 5.0
RULES_DOWN = 5.0
# tproxyd keeps up to this many idle pipes for splice (SPARE_PIPES in
# src/relay/tcp.rs), two descriptors each, by design.
SPARE_PIPES = 64


def payload(name):
    return random.Random(name).randbytes(PAYLOADS[name])


# ---------------------------------------------------------------- WAN servers


def serve(addrs):
    data = {name: payload(name) for name in PAYLOADS}

    class Tcp(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                self.exchange()
            except OSError:
                pass  # the client or the path went away: the client judges

        def exchange(self):
            s = self.request
            s.settimeout(30)
            peer = self.client_address[0]
            f = s.makefile("rb")
            line = f.readline(200).decode().split()
            if not line:
                return
            if line[0] == "GET" and line[1] in data:
                body = data[line[1]]
                s.sendall(f"OK {len(body)} {peer}\n".encode())
                s.sendall(body)
            elif line[0] == "PUT":
                want, h, got = int(line[1]), hashlib.sha256(), 0
                while got < want:
                    chunk = f.read1(min(1 << 16, want - got))
                    if not chunk:
                        return
                    h.update(chunk)
                    got += len(chunk)
                s.sendall(f"{h.hexdigest()} {peer}\n".encode())
            elif line[0] == "PING":
                s.sendall(f"PONG {line[1]} {peer}\n".encode())
            s.shutdown(socket.SHUT_WR)
            # Let the client close first: no TIME_WAIT here either way matters.
            s.recv(1)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 1024

    def udp(addr, port, answer):
        # One socket per address, so answers come from the address asked.
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((addr, port))
        while True:
            msg, peer = u.recvfrom(65535)
            u.sendto(answer(msg, peer[0]), peer)

    for addr in addrs:
        # DNS-like: "Q id name" -> "A id name 192.0.2.53 peer".
        threading.Thread(target=udp, daemon=True, args=(
            addr, DNS_PORT, lambda m, p: b"A" + m[1:] + b" 192.0.2.53 " + p.encode())).start()
        threading.Thread(target=udp, daemon=True, args=(
            addr, ECHO_PORT, lambda m, p: m + b"|" + p.encode())).start()
    Server(("0.0.0.0", TCP_PORT), Tcp).serve_forever()


# ---------------------------------------------------------------- LAN client


class Cut(Exception):
    """The flow was cut cleanly (reset, closed early, refused, lost)."""


class Bad(Exception):
    """The flow went wrong in a way no fault excuses (wrong bytes, hang, misroute)."""


class Leak(Exception):
    """The server saw the LAN client itself: the flow bypassed tproxyd, as
    it does (fail_closed = false) while the rules are gone."""


class Client:
    def __init__(self, a):
        self.a = a
        self.targets = [(a.proxied, a.via_proxy), (a.direct, a.via_direct)]
        self.out = open(a.log, "w", buffering=1)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.digest = {n: hashlib.sha256(payload(n)).hexdigest() for n in PAYLOADS}
        self.upload = payload("u16m")

    def record(self, kind, route, t0, outcome, detail=""):
        line = f"{kind} {route} {t0:.3f} {time.monotonic():.3f} {outcome} {detail}".rstrip()
        with self.lock:
            self.out.write(line.replace("\n", " ") + "\n")

    def flow(self, kind, fn, *args):
        # 2 of 3 flows through dante, 1 of 3 direct.
        route = "proxy" if random.random() < 2 / 3 else "direct"
        dst, via = self.targets[route == "direct"]
        t0 = time.monotonic()
        try:
            fn(dst, via, *args)
            self.record(kind, route, t0, "ok")
        except Cut as e:
            self.record(kind, route, t0, "cut", str(e))
        except Bad as e:
            self.record(kind, route, t0, "bad", str(e))
        except Leak as e:
            self.record(kind, route, t0, "leak", str(e))
        except socket.timeout:
            self.record(kind, route, t0, "hang", f"no progress for {TCP_STALL:.0f} s")
        except (ConnectionError, EOFError) as e:
            self.record(kind, route, t0, "cut", type(e).__name__)
        except OSError as e:
            self.record(kind, route, t0, "cut", f"{type(e).__name__} {e.errno}")

    # -- TCP

    def connect(self, dst):
        s = socket.create_connection((dst, TCP_PORT), timeout=TCP_STALL)
        s.settimeout(TCP_STALL)
        return s

    def seen(self, peer, via):
        """Checks the peer the server saw."""
        if peer == self.a.lan:
            raise Leak(f"came from the client itself, not {via}")
        if peer != via:
            raise Bad(f"came from {peer}, not {via}")

    def header(self, f, via):
        line = f.readline(200).decode()
        if not line.endswith("\n"):
            raise Cut(f"closed in the header ({len(line)} bytes)")
        words = line.split()
        self.seen(words[-1], via)
        return words

    def download(self, dst, via, name):
        with self.connect(dst) as s:
            s.sendall(f"GET {name}\n".encode())
            f = s.makefile("rb")
            words = self.header(f, via)
            size = int(words[1])
            h, got = hashlib.sha256(), 0
            while got < size:
                chunk = f.read1(1 << 16)
                if not chunk:
                    raise Cut(f"closed after {got} of {size} bytes")
                h.update(chunk)
                got += len(chunk)
            if size != PAYLOADS[name] or h.hexdigest() != self.digest[name]:
                raise Bad(f"checksum mismatch ({got} bytes)")
            if f.read1(1):
                raise Bad("bytes after the body")

    def put(self, dst, via):
        with self.connect(dst) as s:
            s.sendall(f"PUT {len(self.upload)}\n".encode())
            s.sendall(self.upload)
            words = self.header(s.makefile("rb"), via)
            if words[0] != self.digest["u16m"]:
                raise Bad("server's checksum of the upload differs")

    def ping(self, dst, via):
        token = f"{random.getrandbits(32):08x}"
        with self.connect(dst) as s:
            s.sendall(f"PING {token}\n".encode())
            f = s.makefile("rb")
            words = self.header(f, via)
            if words[:2] != ["PONG", token]:
                raise Bad(f"wrong answer {words}")

    # -- UDP

    def ask(self, u, dst, port, msg, check):
        """One request, retried; raises Cut when every try went unanswered."""
        for _ in range(1 + UDP_RETRIES):
            u.sendto(msg, (dst, port))
            deadline = time.monotonic() + UDP_WAIT
            while (left := deadline - time.monotonic()) > 0:
                u.settimeout(left)
                try:
                    answer, src = u.recvfrom(65535)
                except socket.timeout:
                    break
                if src != (dst, port):
                    raise Bad(f"answer from {src}")
                if check(answer):
                    return
                # else: a late answer to an earlier try; keep waiting
        raise Cut(f"no answer after {1 + UDP_RETRIES} tries")

    def dns(self, dst, via):
        qid = random.getrandbits(16)
        name = f"host{random.getrandbits(20)}.example"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            want = f"A {qid} {name} 192.0.2.53 {via}".encode()

            def check(answer):
                words = answer.decode(errors="replace").split()
                if words[1:3] == [str(qid), name] and answer != want:
                    self.seen(words[-1], via)
                    raise Bad(f"answer {answer[:80]!r}, wanted {want!r}")
                return answer == want

            self.ask(u, dst, DNS_PORT, f"Q {qid} {name}".encode(), check)

    def echo(self, dst, via):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for seq in range(20):
                body = f"{seq:04d}".encode() + random.randbytes(random.randint(100, 1200))
                want = body + b"|" + via.encode()

                def check(answer, body=body, want=want, seq=seq):
                    if answer[:4] == body[:4] and answer != want:
                        if answer[:len(body) + 1] == body + b"|":
                            self.seen(answer[len(body) + 1:].decode(errors="replace"), via)
                        raise Bad(f"echo {seq} differs ({len(answer)} bytes)")
                    return answer == want

                self.ask(u, dst, ECHO_PORT, body, check)
                time.sleep(0.1)

    # -- workers

    def loop(self, pause, kind, fn, *args):
        while not self.stop.is_set():
            self.flow(kind, fn, *[a() if callable(a) else a for a in args])
            self.stop.wait(pause)

    def bursts(self, every):
        while not self.stop.wait(every):
            ts = [threading.Thread(target=self.flow, args=("bulk", self.download, "b32m"))
                  for _ in range(2)]
            ts.append(threading.Thread(target=self.flow, args=("bulk", self.put)))
            for t in ts:
                t.start()
            for t in ts:
                t.join()

    def main(self):
        workers = [
            *(threading.Thread(target=self.loop, args=(0.2, "dl", self.download,
                                                       lambda: random.choice(DL_NAMES)))
              for _ in range(2)),
            *(threading.Thread(target=self.loop, args=(0.02, "short", self.ping)) for _ in range(4)),
            *(threading.Thread(target=self.loop, args=(0.1, "dns", self.dns)) for _ in range(2)),
            *(threading.Thread(target=self.loop, args=(0.2, "echo", self.echo)) for _ in range(2)),
            threading.Thread(target=self.bursts, args=(20,)),
        ]
        for w in workers:
            w.start()
        self.stop.wait(self.a.seconds)
        self.stop.set()
        for w in workers:
            w.join()
        self.out.close()


def client(a):
    Client(a).main()


# ---------------------------------------------------------------- orchestrator


CONFIG = """\
# Written by bench/soak.py.
listen = "[::]:1090"
mode = "tproxy"

[[outbounds]]
name = "proxy"
type = "socks5"
server = "{socks}"

[[outbounds]]
name = "direct"
type = "direct"

[route]
final = "proxy"

[[route.rules]]
dst = ["{direct}/32"]
outbound = "direct"

[timeouts]
# Shorter than the defaults (300, 60), so flows orphaned by a fault
# (the client reset while the rules were gone) are let go within the
# final idle period.
tcp_idle = {tcp_idle}
udp_idle = 30

[firewall]
backend = "nftables"
lan_interfaces = ["{lan_if}"]
"""


class Soak:
    def __init__(self, p, workdir):
        self.p = p
        self.dir = workdir
        self.prefix = f"tps{os.getpid()}"
        self.tproxyd = None
        self.dante = None  # a dante started by us (the first one is the bed's)
        self.faults = []  # (kind, start, end) in monotonic seconds
        self.events = []  # (t, text) for the report
        self.samples = []
        self.failures = []
        self.t0 = time.monotonic()

    def rel(self, t):
        return t - self.t0

    def note(self, text):
        self.events.append((self.rel(time.monotonic()), text))
        log(text)

    # -- bed

    def up(self):
        out = run([TPROXYD, "testbed", "up", "--prefix", self.prefix, "--bench",
                   "--dante", self.dir / "dante", "--json"])
        bed = json.loads(out.stdout)
        names, addrs = bed["namespaces"], bed["addresses"]
        self.lan, self.router, self.wan = (Netns(names[k]) for k in ("lan", "router", "wan"))
        self.proxied, self.direct = addrs["remote_a_v4"], addrs["remote_b_v4"]
        self.socks = f"{addrs['wan_v4']}:{bed['socks_port']}"
        self.dante_host = addrs["wan_v4"]
        self.router_wan = addrs["router_wan_v4"]
        self.lan_addr = addrs["lan_v4"]
        self.lan_if = bed["interfaces"]["router_lan"]
        self.cfg = self.dir / "tproxyd.toml"
        self.cfg.write_text(CONFIG.format(socks=self.socks, direct=self.direct,
                                          lan_if=self.lan_if, tcp_idle=self.p.tcp_idle))
        run([TPROXYD, "check", "-c", self.cfg])
        self.wan.spawn(sys.executable, __file__, "serve", self.proxied, self.direct, log_to=self.dir / "serve.log")
        self.wan.wait_listening("tcp", TCP_PORT, "soak server")
        self.wan.wait_listening("udp", ECHO_PORT, "soak server")

    def down(self):
        run([TPROXYD, "testbed", "down", "--prefix", self.prefix], check=False)

    def start_tproxyd(self):
        self.tproxyd = self.router.spawn(TPROXYD, "run", "-c", self.cfg,
                                         log_to=self.dir / "tproxyd.log")
        self.router.wait_listening("tcp", 1090, "tproxyd")
        deadline = time.time() + 10
        while not self.rules_present():
            if time.time() > deadline:
                raise BenchError("tproxyd did not install its rules")
            time.sleep(0.05)
        # `ip netns exec` execs tproxyd: the child's pid is tproxyd's.
        self.pid = self.tproxyd.pid

    def rules_present(self):
        return self.router.sh("nft", "list", "table", "inet", "tproxyd", check=False).returncode == 0

    # -- faults

    def dante_pids(self):
        pids = run(["ip", "netns", "pids", self.wan.name], check=False).stdout.split()
        return [int(x) for x in pids
                if Path(f"/proc/{x}/comm").exists() and Path(f"/proc/{x}/comm").read_text().strip() == "danted"]

    def kill_dante(self):
        t = time.monotonic()
        pids = self.dante_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.dante is not None:
            self.dante.wait()
        self.note(f"fault: dante killed (SIGKILL to {len(pids)} processes)")
        time.sleep(DANTE_DOWN)
        d = self.dir / "dante"
        self.dante = self.wan.spawn("danted", "-f", d / "danted.conf", "-p", d / "danted.pid",
                       log_to=d / "danted.restart.err")
        self.wan.wait_listening("tcp", 1080, "dante (restarted)")
        self.faults.append(("dante", t, time.monotonic()))
        self.note("fault over: dante restarted and listening")

    def drop_rules(self):
        t = time.monotonic()
        self.router.sh(TPROXYD, "rules", "remove", "-c", self.cfg)
        if self.rules_present():
            self.fail("`tproxyd rules remove` left the nft table")
        self.note("fault: tproxyd's rules removed")
        time.sleep(RULES_DOWN)
        self.router.sh(TPROXYD, "rules", "apply", "-c", self.cfg)
        if not self.rules_present():
            self.fail("`tproxyd rules apply` did not install the nft table")
        self.faults.append(("rules", t, time.monotonic()))
        self.note("fault over: rules applied again")

    def hup(self):
        os.kill(self.pid, signal.SIGHUP)
        time.sleep(0.5)
        if self.tproxyd.poll() is not None:
            self.fail(f"tproxyd exited ({self.tproxyd.returncode}) after SIGHUP")
        else:
            self.note("SIGHUP sent; tproxyd still running")

    # -- samples

    def sample(self, label):
        pid = self.pid
        rss = proc_status(pid, "VmRSS")
        kinds = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            kind = target.split(":")[0] if ":" in target else "file"
            kinds[kind] = kinds.get(kind, 0) + 1
        fds = sum(kinds.values())
        pipes = kinds.get("pipe", 0)
        tcp = {}
        for line in self.router.sh("ss", "-Htan").stdout.splitlines():
            state = line.split()[0]
            tcp[state] = tcp.get(state, 0) + 1
        udp = len(self.router.sh("ss", "-Hua").stdout.splitlines())
        s = {"t": round(self.rel(time.monotonic())), "label": label, "rss_kib": rss, "fds": fds,
             "pipes": pipes, "fd_kinds": kinds, "tcp": tcp, "udp": udp}
        self.samples.append(s)
        log(f"sample {label}: RSS {rss / 1024:.2f} MiB, {fds} fds ({kinds}), tcp {tcp}, udp {udp}")
        return s

    @staticmethod
    def other_fds(s):
        return s["fds"] - s["pipes"]

    def fail(self, why):
        self.failures.append(why)
        log(f"FAIL: {why}")

    def alive(self):
        if self.tproxyd.poll() is not None:
            raise BenchError(f"tproxyd died (exit {self.tproxyd.returncode}); see {self.dir}/tproxyd.log")

    # -- run

    def run(self):
        p = self.p
        seconds = p.minutes * 60
        every = 10 if p.minutes <= 2 else 60
        cycle = 30 if p.minutes <= 2 else 60
        self.up()
        self.start_tproxyd()
        time.sleep(1)
        start = self.sample("start")
        self.t0 = time.monotonic()
        start["t"] = 0
        flows_log = self.dir / "flows.log"
        cl = self.lan.spawn(sys.executable, __file__, "client", "--seconds", seconds,
                            "--proxied", self.proxied, "--via-proxy", self.dante_host,
                            "--direct", self.direct, "--via-direct", self.router_wan,
                            "--lan", self.lan_addr,
                            "--log", flows_log, log_to=self.dir / "client.log")
        # Each cycle: SIGHUP at 5 s, dante fault at 1/3, rules fault at 2/3.
        schedule = []
        for c in range(int(seconds // cycle)):
            base = c * cycle
            schedule += [(base + 5, self.hup), (base + cycle / 3, self.kill_dante),
                         (base + 2 * cycle / 3, self.drop_rules)]
        # No fault may end past the traffic.
        schedule = [(t, f) for t, f in schedule if t + 10 < seconds]
        next_sample = every
        while True:
            now = self.rel(time.monotonic())
            if now >= seconds:
                break
            if schedule and now >= schedule[0][0]:
                schedule.pop(0)[1]()
                self.alive()
                continue
            if now >= next_sample:
                self.alive()
                self.sample(f"{next_sample // 60}m" if every == 60 else f"{next_sample}s")
                next_sample += every
                continue
            time.sleep(0.1)
        try:
            cl.wait(timeout=TCP_STALL * 4 + 60)
        except subprocess.TimeoutExpired:
            cl.kill()
            self.fail("the client did not finish (a flow hung beyond every timeout)")
        if cl.returncode:
            self.fail(f"the client exited {cl.returncode}; see {self.dir}/client.log")
        self.alive()
        self.sample("traffic end")
        # The final idle period: until descriptors and RSS are back within
        # tolerance, at most p.idle seconds.
        t_end = time.monotonic()
        while True:
            time.sleep(5)
            self.alive()
            s = self.sample("idle")
            ok = (self.other_fds(s) <= self.other_fds(start) + p.fd_tol
                  and s["pipes"] <= 2 * SPARE_PIPES
                  and s["rss_kib"] <= start["rss_kib"] + p.rss_tol_mib * 1024)
            if ok or time.monotonic() - t_end >= p.idle:
                break
        s["label"] = f"after {time.monotonic() - t_end:.0f} s idle"
        self.idle_took = time.monotonic() - t_end
        if self.other_fds(s) > self.other_fds(start) + p.fd_tol:
            self.fail(f"descriptors other than pipes {self.other_fds(s)} > start "
                      f"{self.other_fds(start)} + {p.fd_tol}")
        if s["pipes"] > 2 * SPARE_PIPES:
            self.fail(f"{s['pipes']} pipe descriptors, more than the spare pool's {SPARE_PIPES} pipes")
        if s["rss_kib"] > start["rss_kib"] + p.rss_tol_mib * 1024:
            self.fail(f"RSS {s['rss_kib'] / 1024:.2f} MiB > start {start['rss_kib'] / 1024:.2f} "
                      f"+ {p.rss_tol_mib} MiB")
        self.peak_rss = proc_status(self.pid, "VmHWM")
        self.flows = self.judge(flows_log)
        self.stop_tproxyd()

    def stop_tproxyd(self):
        self.tproxyd.send_signal(signal.SIGTERM)
        try:
            rc = self.tproxyd.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.tproxyd.kill()
            self.tproxyd.wait()
            rc = "hung on SIGTERM"
        self.exit = rc
        if rc != 0:
            self.fail(f"tproxyd exited {rc} on SIGTERM")
        if self.rules_present():
            self.fail("nft table inet tproxyd still there after tproxyd stopped")
        if "lookup 1090" in self.router.sh("ip", "rule", "show").stdout:
            self.fail("tproxyd's ip rule still there after tproxyd stopped")
        text = (self.dir / "tproxyd.log").read_text(errors="replace")
        if "panicked" in text or "panic" in text.lower():
            self.fail("tproxyd's log shows a panic")
        self.hups_logged = text.count("SIGHUP received")

    def judge(self, flows_log):
        windows = [(k, a - BEFORE, b + AFTER) for k, a, b in self.faults]
        table = {}
        bad = []
        for line in flows_log.read_text().splitlines():
            kind, route, t0, t1, outcome, *detail = line.split(" ", 5)
            t0, t1 = float(t0), float(t1)
            hit = {k for k, a, b in windows if t0 < b and t1 > a}
            row = table.setdefault(kind, {"ok": 0, "ok_exposed": 0, "cut": 0, "leak": 0, "failed": 0})
            if outcome == "ok":
                row["ok_exposed" if hit else "ok"] += 1
            elif outcome == "cut" and hit:
                row["cut"] += 1
            elif outcome == "leak" and "rules" in hit:
                row["leak"] += 1
            else:
                row["failed"] += 1
                why = "outside any fault window" if outcome in ("cut", "leak") else outcome
                bad.append(f"{kind} via {route} at {self.rel(t0):.1f}-{self.rel(t1):.1f} s: "
                           f"{' '.join(detail)} ({why})")
        for b in bad[:20]:
            self.fail(f"flow failed: {b}")
        if len(bad) > 20:
            self.fail(f"... and {len(bad) - 20} more failed flows")
        for kind in ("dl", "bulk", "short", "dns", "echo"):
            if not table.get(kind, {}).get("ok"):
                self.fail(f"no {kind} flow succeeded outside the fault windows")
        return table


def report(soak, p, info):
    samples = soak.samples
    start = samples[0]
    lines = [
        "# tproxyd soak with faults",
        "",
        f"Run on {info['date']} with `scripts/soak {p.minutes:g}`: {p.minutes:g} minutes of mixed "
        f"traffic, then an idle period. {info['tproxyd']}, release build; {info['machine']}.",
        "",
        f"**Verdict: {'PASS' if not soak.failures else 'FAIL'}**",
        "",
    ]
    if soak.failures:
        lines += [f"- {f}" for f in soak.failures] + [""]
    lines += [
        "## Set-up",
        "",
        "The test bed's three namespaces (`tproxyd testbed up --bench`). tproxyd runs in the "
        "router with its own nftables rules (TPROXY, `lan_interfaces = [rlan]`): flows to "
        f"remote A ({soak.proxied}) go through SOCKS5 to dante ({soak.socks}), flows to "
        f"remote B ({soak.direct}) go direct by a `dst` rule. `tcp_idle = {p.tcp_idle}`, "
        "`udp_idle = 30` (shorter than the defaults, so flows orphaned by a fault are let go "
        "within the idle period); everything else default. Traffic from the LAN namespace, "
        "two flows in three through dante:",
        "",
        "- dl: downloads of known content (64 KiB, 256 KiB, 1 MiB), SHA-256 checked; 2 loops",
        "- bulk: every 20 s, two 32 MiB downloads and one 16 MiB upload at once, checked",
        "- short: short connections, one request and answer each; 4 loops",
        "- dns: DNS-like UDP query/answer to port 53, a new socket each, 2 retries after 1 s; 2 loops",
        "- echo: a UDP socket doing 20 echo exchanges of 100–1200 bytes; 2 loops",
        "",
        "Every answer names the address the server saw, so a flow that took the wrong path "
        "fails. A TCP flow with no progress for 15 s counts as hung.",
        "",
        "## Faults injected",
        "",
        f"Every {30 if p.minutes <= 2 else 60} s: SIGHUP (not a fault window: flows across it "
        f"must succeed), dante killed (SIGKILL) and restarted {DANTE_DOWN:.0f} s later, "
        f"tproxyd's rules removed and applied again {RULES_DOWN:.0f} s later. "
        f"A flow overlapping a fault, from {BEFORE} s before it to {AFTER} s after, is "
        "exposed: it may be cut (reset, closed early, unanswered) but never corrupted or hung.",
        "",
        "| t (s) | event |",
        "|---|---|",
    ]
    lines += [f"| {t:.1f} | {e} |" for t, e in soak.events]
    n = {k: sum(1 for f in soak.faults if f[0] == k) for k in ("dante", "rules")}
    lines += [
        "",
        f"{n['dante']} dante kills, {n['rules']} rule removals, "
        f"{sum(1 for _, e in soak.events if e.startswith('SIGHUP'))} SIGHUPs "
        f"({getattr(soak, 'hups_logged', '?')} logged by tproxyd).",
        "",
        "## Flows",
        "",
        "ok (no fault): the flow overlapped no fault window and all its bytes checked out "
        "(these must all be ok); ok (exposed): overlapped a fault and still succeeded; cut: "
        "overlapped a fault and was reset, closed early or (UDP) went unanswered; bypassed: "
        "overlapped a rules removal and reached the server straight from the client "
        "(no rules, no capture: expected with `fail_closed = false`); failed: anything else "
        "(wrong bytes, a hang, a wrong path, or a cut outside any fault).",
        "",
        "| kind | ok (no fault) | ok (exposed) | cut | bypassed | failed |",
        "|---|---|---|---|---|---|",
    ]
    tot = [0, 0, 0, 0, 0]
    for kind, row in sorted(soak.flows.items()):
        vals = [row["ok"], row["ok_exposed"], row["cut"], row["leak"], row["failed"]]
        tot = [a + b for a, b in zip(tot, vals)]
        lines.append(f"| {kind} | " + " | ".join(f"{v:,}" for v in vals) + " |")
    lines.append("| **all** | " + " | ".join(f"**{v:,}**" for v in tot) + " |")
    lines += [
        "",
        "## tproxyd over time",
        "",
        "RSS and open descriptors of the tproxyd process; sockets in the router namespace "
        "(`ss`; TCP by state, UDP all).",
        "",
        "| t (s) | sample | RSS (MiB) | fds | of which pipes | TCP ESTAB | TCP TIME-WAIT | TCP other | UDP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in samples:
        tcp = s["tcp"]
        other = sum(v for k, v in tcp.items() if k not in ("ESTAB", "TIME-WAIT"))
        lines.append(f"| {s['t']} | {s['label']} | {s['rss_kib'] / 1024:.2f} | {s['fds']} | {s['pipes']} | "
                     f"{tcp.get('ESTAB', 0)} | {tcp.get('TIME-WAIT', 0)} | {other} | {s['udp']} |")
    end = samples[-1]
    lines += [
        "",
        f"Tolerance after the final idle period: descriptors other than pipes ≤ start + "
        f"{p.fd_tol} ({Soak.other_fds(start)} + {p.fd_tol}); pipes ≤ {2 * SPARE_PIPES} "
        f"(tproxyd keeps up to {SPARE_PIPES} spare pipes for splice, by design); RSS ≤ start + "
        f"{p.rss_tol_mib} MiB ({start['rss_kib'] / 1024:.2f} + {p.rss_tol_mib}). At the end: "
        f"{Soak.other_fds(end)} descriptors other than pipes ({end['fd_kinds']}), {end['pipes']} "
        f"pipe descriptors, {end['rss_kib'] / 1024:.2f} MiB, reached after {soak.idle_took:.0f} s "
        f"idle (at most {p.idle} s allowed); peak RSS {soak.peak_rss / 1024:.2f} MiB.",
        "",
        "## After stop",
        "",
        f"- tproxyd exit status on SIGTERM: {getattr(soak, 'exit', '?')}; panic in its log: "
        f"{'yes' if any('panic' in f for f in soak.failures) else 'no'}.",
        f"- nft table inet tproxyd after stop: {'present' if any('nft table' in f for f in soak.failures) else 'gone'}; "
        f"ip rule: {'present' if any('ip rule' in f for f in soak.failures) else 'gone'}.",
        f"- namespaces after `testbed down`: {'left' if any('namespace' in f for f in soak.failures) else 'gone'}.",
        "",
    ]
    return "\n".join(lines)


def orchestrate(p):
    if os.geteuid() != 0:
        sys.exit("soak: needs root (network namespaces); run it through scripts/soak")
    if not TPROXYD.exists():
        sys.exit(f"soak: {TPROXYD} is missing; scripts/soak builds it")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("soak: terminated"))
    max_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="tproxyd-soak-"))
    (workdir / "dante").mkdir()
    log(f"soak: {p.minutes} min; logs in {workdir}")
    soak = Soak(p, workdir)
    completed = False
    try:
        soak.run()
        completed = True
    except (BenchError, subprocess.TimeoutExpired) as e:
        soak.fail(str(e))
    finally:
        if soak.tproxyd is not None and soak.tproxyd.poll() is None:
            soak.tproxyd.terminate()
            try:
                soak.tproxyd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                soak.tproxyd.kill()
        soak.down()
    left = [n for n in run(["ip", "netns", "list"]).stdout.split() if n.startswith(soak.prefix + "-")]
    if left:
        soak.fail(f"namespaces left: {', '.join(left)}")
    if not completed:
        log(f"soak: FAIL before the end: {'; '.join(soak.failures)}; logs in {workdir}")
        return 1
    commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    version = run([TPROXYD, "--version"], check=False).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    info = {"date": datetime.date.today().isoformat(), "tproxyd": f"{version} ({commit})",
            "machine": f"{cpu}, {os.cpu_count()} cores shared with other work"}
    p.out.parent.mkdir(parents=True, exist_ok=True)
    p.out.write_text(report(soak, p, info))
    (workdir / "samples.json").write_text(json.dumps(soak.samples, indent=1))
    verdict = "PASS" if not soak.failures else "FAIL"
    log(f"soak: {verdict}; report {p.out}; logs in {workdir}")
    return 0 if not soak.failures else 1


def main():
    if sys.argv[1:2] == ["serve"]:
        return serve(sys.argv[2:])
    if sys.argv[1:2] == ["client"]:
        c = argparse.ArgumentParser(prog="soak.py client")
        c.add_argument("--seconds", type=float, required=True)
        for k in ("proxied", "via-proxy", "direct", "via-direct", "lan", "log"):
            c.add_argument(f"--{k}", required=True)
        return client(c.parse_args(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("minutes", type=float, nargs="?", default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/SOAK.md", help="the report")
    ap.add_argument("--idle", type=int, default=90, help="longest final idle period, s")
    ap.add_argument("--fd-tol", type=int, default=8, help="descriptors allowed above the start")
    ap.add_argument("--rss-tol-mib", type=float, default=2, help="RSS allowed above the start, MiB")
    ap.add_argument("--tcp-idle", type=int, default=60, help="tproxyd's timeouts.tcp_idle, s")
    return orchestrate(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
