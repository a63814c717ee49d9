#!/usr/bin/python3
"""tproxyd benchmark: tproxyd against plain routing and peer proxies.

Brings up the three-namespace test bed of the end-to-end tests and the
demo (`tproxyd testbed up`, from src/testbed.rs, which also starts dante),
starts the other WAN servers once, then measures every configuration in
rounds, rotating their order each round so slow drifts of the machine hit
all of them alike. Medians across rounds are reported, with the spread
(max-min over median) as the noise.

    lan ──veth── router (proxy under test + rules) ──veth── wan
    192.0.2.2    192.0.2.1 / 203.0.113.1                    203.0.113.2  dante :1080, ss-server :8388
                                                            198.51.100.10 (lo) loadgen :8000, iperf3 :5201

Run it through bench/run, which installs the tools and builds the binaries.
Every packet stays inside the namespaces this script makes.
"""

import argparse
import base64
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TPROXYD = ROOT / "target/release/tproxyd"
# An earlier build of tproxyd (bench/run --baseline REV builds it): the
# "tproxyd-baseline" configuration runs it, so a change's cost is measured
# against the release before it, round by round.
BASELINE = ROOT / "target/baseline/release/tproxyd"
LOADGEN = ROOT / "target/release/examples/loadgen"

RR_PORT = 8000
IPERF_PORT = 5201
SS_PORT = 8388
SS_KEY = "tproxyd-bench"
# The fastest AEAD cipher shadowsocks-libev has on a CPU with AES-NI; it
# has no "none" cipher, so ss-redir's figures include encryption.
SS_METHOD = "aes-128-gcm"
# shadowsocks-rust's ssserver and sslocal, which scripts/setup-test-deps
# builds once into this cache (SS_RUST_BIN in src/testbed/shadowsocks.rs).
SS_RUST_BIN = Path("/var/cache/tproxyd-test/shadowsocks-rust-1.25.0/bin")
# The shadowsocks set (issue 20): tproxyd's shadowsocks outbound against
# ss-redir and sslocal's redir mode, to the same server with the same
# method. tag: (method, server). ss-server (libev) has no 2022 methods, so
# 2022 goes to ssserver and only tproxyd and sslocal compare there.
SS_SET_METHODS = {
    "aes128": ("aes-128-gcm", "ss-server"),
    "chacha": ("chacha20-ietf-poly1305", "ss-server"),
    "2022aes128": ("2022-blake3-aes-128-gcm", "ssserver"),
}
# A 2022 key is base64 of exactly the key length (16 bytes for aes-128).
SS_KEY_2022 = base64.b64encode(b"tproxyd-bench-16").decode()
# The figures the shadowsocks set is measured on (the list; the
# others would double the run for little).
SS_FIGURES = {"tcp1", "tcp8", "cpu_per_gib", "crr", "cpu_per_conn", "udp_rr", "udp_bulk",
              "udp_loss", "peak_rss", "rss"}
# The server name of the TLS exchanges (crr_tls, tls_p50): no rule of
# tproxyd-rules matches it, so its lookup tries every label and fails.
TLS_SNI = "www.tproxyd-bench.com"
# tproxyd-rules' rule sets, as issue 9 sizes them.
RULE_DOMAINS = 100_000
RULE_PREFIXES = 10_000
# Mark and table the peers' TPROXY rules use (tproxyd installs its own).
PEER_MARK = 1
PEER_TABLE = 100

# (key, title, unit, better, needs): needs is "tcp" or "udp" (the
# configuration must carry it) plus "proxy" (a process to measure).
FIGURES = [
    ("tcp1", "TCP bulk, 1 stream", "Gbit/s", "higher", {"tcp"}),
    ("tcp8", "TCP bulk, 8 streams", "Gbit/s", "higher", {"tcp"}),
    ("crr", "New TCP connections (64 clients)", "conn/s", "higher", {"tcp"}),
    ("crr_tls", "New TCP connections, TLS ClientHello first (64 clients)", "conn/s", "higher", {"tcp"}),
    ("cpu_per_conn", "Proxy CPU per new TCP connection", "µs", "lower", {"tcp", "proxy"}),
    ("cpu_per_tls_conn", "Proxy CPU per new TCP connection, TLS first", "µs", "lower", {"tcp", "proxy"}),
    ("udp_rr", "UDP request/response (64 ports)", "exchanges/s", "higher", {"udp"}),
    ("udp_bulk", "UDP bulk upload received", "Mbit/s", "higher", {"udp"}),
    ("udp_loss", "UDP bulk loss", "%", "lower", {"udp"}),
    ("udp_down", "UDP bulk download received", "Mbit/s", "higher", {"udp"}),
    ("tcp_p50", "TCP exchange latency p50", "µs", "lower", {"tcp"}),
    ("tcp_p99", "TCP exchange latency p99", "µs", "lower", {"tcp"}),
    ("tls_p50", "TLS ClientHello exchange latency p50", "µs", "lower", {"tcp"}),
    ("tls_p99", "TLS ClientHello exchange latency p99", "µs", "lower", {"tcp"}),
    ("udp_p50", "UDP exchange latency p50", "µs", "lower", {"udp"}),
    ("udp_p99", "UDP exchange latency p99", "µs", "lower", {"udp"}),
    ("cpu_per_gib", "Proxy CPU per GiB (TCP bulk)", "s/GiB", "lower", {"tcp", "proxy"}),
    ("peak_rss", "Proxy peak RSS", "MiB", "lower", {"proxy"}),
    ("rss", "Proxy RSS after the tests", "MiB", "lower", {"proxy"}),
    ("idle_rss", "RSS per idle TCP connection", "KiB", "lower", {"tcp", "proxy"}),
    ("flood_rss", "RSS growth after a flood of new UDP client ports", "MiB", "lower", {"udp", "proxy"}),
]
FIGURE = {f[0]: f for f in FIGURES}
# Latency figures are compared by what the proxy adds to plain routing.
ADDED = {"tcp_p50", "tcp_p99", "tls_p50", "tls_p99", "udp_p50", "udp_p99"}
# Figures measured together with another: --figures names the first.
MEASURED_WITH = {"tcp_p99": "tcp_p50", "tls_p99": "tls_p50", "udp_p99": "udp_p50",
                 "udp_loss": "udp_bulk", "tcp8": "tcp1", "cpu_per_gib": "tcp1", "rss": "peak_rss",
                 "cpu_per_conn": "crr", "cpu_per_tls_conn": "crr_tls"}


def chosen(p, key):
    """Whether --figures (absent: all) asks for this figure."""
    return not p.figures or MEASURED_WITH.get(key, key) in p.figures


class BenchError(Exception):
    pass


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, check=True, timeout=60, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def max_nofile():
    """Lets every process we start have as many descriptors as we may."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Netns:
    """A namespace of the test bed (which creates and deletes it)."""

    def __init__(self, name):
        self.name = name

    def cmd(self, *args):
        return ["ip", "netns", "exec", self.name, *map(str, args)]

    def sh(self, *args, **kw):
        return run(self.cmd(*args), **kw)

    def ip(self, args):
        run(["ip", "-n", self.name, *args.split()])

    def spawn(self, *args, log_to=None, stdin=subprocess.DEVNULL, stdout=None):
        out = open(log_to, "ab") if log_to else subprocess.DEVNULL
        return subprocess.Popen(
            self.cmd(*args),
            stdin=stdin,
            stdout=stdout if stdout is not None else out,
            stderr=out,
            preexec_fn=max_nofile,
        )

    def listening(self, proto, port):
        flag = "-Hlnt" if proto == "tcp" else "-Hlnu"
        return bool(self.sh("ss", flag, f"sport = :{port}", check=False).stdout.strip())

    def wait_listening(self, proto, port, what, seconds=10):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.listening(proto, port):
                return
            time.sleep(0.05)
        raise BenchError(f"{what} did not start listening on {proto} port {port}")


class Bed:
    """The namespaces, addresses and the WAN servers shared by all runs."""

    def __init__(self, workdir):
        self.dir = workdir
        self.prefix = f"tpb{os.getpid()}"
        # The bench's sysctls (wide port range, tcp_tw_reuse, backlogs) in
        # every namespace; dante started in the WAN one, its files here.
        up = run([TPROXYD, "testbed", "up", "--prefix", self.prefix, "--bench",
                  "--dante", workdir, "--json"])
        try:
            bed = json.loads(up.stdout)
            names, addrs = bed["namespaces"], bed["addresses"]
            self.lan = Netns(names["lan"])
            self.router = Netns(names["router"])
            self.wan = Netns(names["wan"])
            self.server = addrs["remote_a_v4"]
            self.remote_net = addrs["remote_net_v4"]
            self.wan_host = addrs["wan_v4"]
            self.lan_if = bed["interfaces"]["router_lan"]
            self.socks_port = bed["socks_port"]
            self._servers()
        except BaseException:
            self.close()
            raise

    def settle(self, seconds=60):
        """Waits until the flows of the last test are gone from the router
        and the WAN side (dante takes a while to tear down thousands), so
        no configuration is measured while another's leftovers burn CPU."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            # Every socket still in a connection (closing ones included,
            # TIME_WAIT excepted): an orphan in LAST_ACK would swallow a new
            # client's SYN that happens to reuse its port.
            busy = sum(
                len(ns.sh("ss", "-Htan", "state", "connected", "exclude", "time-wait",
                          check=False).stdout.splitlines())
                for ns in (self.router, self.wan)
            )
            if busy < 50:
                return
            time.sleep(0.25)
        log(f"flows still open after {seconds} s; measuring anyway")

    def close(self):
        """Kills everything in the namespaces and deletes them."""
        run([TPROXYD, "testbed", "down", "--prefix", self.prefix], check=False)

    def _servers(self):
        wan = self.wan
        server = f"{self.server}:{RR_PORT}"
        wan.spawn(LOADGEN, "serve", "--tcp", server, "--udp", server,
                  log_to=self.dir / "loadgen-serve.log")
        wan.wait_listening("tcp", RR_PORT, "loadgen serve")
        wan.spawn("ss-server", "-s", self.wan_host, "-p", SS_PORT, "-k", SS_KEY, "-m", SS_METHOD,
                  "-u", "-n", "20000", log_to=self.dir / "ss-server.log")
        wan.wait_listening("tcp", SS_PORT, "ss-server")
        self.ss_ports = {(SS_METHOD, "ss-server"): SS_PORT}

    def ss_server(self, method, server):
        """The port of a shadowsocks server (ss-server or ssserver) with
        `method`, started on first use and kept for the whole run, like the
        other WAN servers. libev's -u is TCP and UDP; ssserver's is -U."""
        if (method, server) in self.ss_ports:
            return self.ss_ports[(method, server)]
        port = SS_PORT + len(self.ss_ports)
        log_to = self.dir / f"{server}-{method}.log"
        if server == "ss-server":
            self.wan.spawn("ss-server", "-s", self.wan_host, "-p", port, "-k", ss_key(method),
                           "-m", method, "-u", "-n", "20000", log_to=log_to)
        else:
            self.wan.spawn(SS_RUST_BIN / "ssserver", "-s", f"{self.wan_host}:{port}", "-k",
                           ss_key(method), "-m", method, "-U", "-n", "20000", log_to=log_to)
        self.wan.wait_listening("tcp", port, server)
        self.wan.wait_listening("udp", port, server)
        self.ss_ports[(method, server)] = port
        return port


def ss_key(method):
    return SS_KEY_2022 if method.startswith("2022-") else SS_KEY


# ---------------------------------------------------------------- configurations


class Config:
    name = ""
    label = ""
    carries = {"tcp", "udp"}
    proxy = True
    port = 0
    # Descriptors the proxy holds per relayed TCP connection; with the
    # machine's limit, this caps the idle-connection count.
    fds_per_conn = 2
    # The figures this configuration is measured on; None: every one.
    figures = None

    def __init__(self, bed):
        self.bed = bed
        self.proc = None

    def supports(self, figure):
        needs = FIGURE[figure][4]
        have = set(self.carries) | ({"proxy"} if self.proxy else set())
        return needs <= have and (self.figures is None or figure in self.figures)

    def start(self):
        pass

    def stop(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def log(self):
        return self.bed.dir / f"{self.name}.log"


class Plain(Config):
    name, label, proxy = "plain", "plain routing", False


class PeerTproxyRules:
    """TPROXY rules and the policy route for a peer, as its docs show them."""

    def install_rules(self, port, tcp_redirect=False):
        rtr = self.bed.router
        lines = ["table ip tpbench {"]
        if tcp_redirect:
            lines += [
                "  chain nat { type nat hook prerouting priority dstnat;",
                f'    iifname "{self.bed.lan_if}" ip daddr {self.bed.remote_net} meta l4proto tcp '
                f"redirect to :{port}",
                "  }",
            ]
        else:
            lines += [
                "  chain pre { type filter hook prerouting priority mangle;",
                f'    iifname "{self.bed.lan_if}" ip daddr {self.bed.remote_net} meta l4proto {{ tcp, udp }} '
                f"tproxy to :{port} meta mark set {PEER_MARK} accept",
                "  }",
            ]
        lines.append("}")
        rules = self.bed.dir / f"{self.name}.nft"
        rules.write_text("\n".join(lines) + "\n")
        rtr.sh("nft", "-f", rules)
        if not tcp_redirect:
            rtr.ip(f"rule add fwmark {PEER_MARK} lookup {PEER_TABLE}")
            rtr.ip(f"route add local 0.0.0.0/0 dev lo table {PEER_TABLE}")

    def stop(self):
        # The process first, with its rules still in place: the clients'
        # answers to its closing sockets must still reach them, or those
        # sockets linger in LAST_ACK after the rules are gone.
        Config.stop(self)
        self.bed.settle()
        self.remove_rules()

    def remove_rules(self):
        rtr = self.bed.router
        rtr.sh("nft", "delete", "table", "ip", "tpbench", check=False)
        run(["ip", "-n", rtr.name, "rule", "del", "fwmark", str(PEER_MARK), "lookup", str(PEER_TABLE)],
            check=False)
        run(["ip", "-n", rtr.name, "route", "flush", "table", str(PEER_TABLE)], check=False)


class Tproxyd(Config):
    port = 1090

    def upstream(self):
        return []

    def args(self):
        return [*self.upstream(), "--lan-interface", self.bed.lan_if]

    # The build that runs (TproxydBaseline runs another).
    binary = TPROXYD

    def start(self):
        if not self.binary.exists():
            raise BenchError(f"{self.binary} is missing: run bench/run (--baseline REV for the baseline)")
        self.proc = self.bed.router.spawn(self.binary, "run", *self.args(), log_to=self.log())
        try:
            self.bed.router.wait_listening("tcp", self.port, "tproxyd")
        except BenchError as e:
            if self.proc.poll() is not None:
                # It refused to start: its last words say why.
                last = self.log().read_text(errors="replace").strip().splitlines()[-1:]
                raise BenchError(f"tproxyd exited: {''.join(last)}") from e
            raise
        self.bed.router.wait_listening("udp", self.port, "tproxyd")
        # tproxyd installs its rules after binding; give it the moment.
        deadline = time.time() + 10
        while "tproxyd" not in self.bed.router.sh("nft", "list", "tables").stdout:
            if time.time() > deadline:
                raise BenchError("tproxyd did not install its rules")
            time.sleep(0.05)


class TproxydDirect(Tproxyd):
    name, label = "tproxyd-direct", "tproxyd direct"

    def upstream(self):
        return ["--direct"]


class TproxydBaseline(TproxydDirect):
    """tproxyd direct as built from an earlier commit (bench/run --baseline
    REV): the same flows through the release before, for the cost of what
    changed since (issue 11: the flow registry and its counters)."""

    name, label = "tproxyd-baseline", "tproxyd direct (baseline build)"
    binary = BASELINE


class TproxydSocks(Tproxyd):
    name, label = "tproxyd-socks5", "tproxyd → SOCKS5"

    def upstream(self):
        return ["--socks5", f"{self.bed.wan_host}:{self.bed.socks_port}"]


class TproxydRules(Tproxyd):
    """tproxyd direct with issue 9's load of rules: 100,000 domain suffixes
    and 10,000 prefixes in rule sets, plus a few plain rules, all sending
    their matches to a SOCKS5 outbound (dante). No rule matches the bench's
    flows (their address, nor the TLS exchanges' name), so every flow is
    looked up in full and goes to final = direct: compared with
    tproxyd-direct, the difference is the rules' cost. Domain rules make
    tproxyd sniff each new TCP flow's first bytes; the bench's clients
    send first, so the sniff must not wait."""

    name, label = "tproxyd-rules", "tproxyd direct + 110k rules"

    def args(self):
        domains = self.bed.dir / "rules-domains.txt"
        cidr = self.bed.dir / "rules-cidr.txt"
        domains.write_text(rule_domains())
        cidr.write_text(rule_prefixes(self.bed))
        conf = self.bed.dir / "tproxyd-rules.toml"
        conf.write_text(f"""listen = "[::]:{self.port}"

[[outbounds]]
name = "direct"
type = "direct"

[[outbounds]]
name = "proxy"
type = "socks5"
server = "{self.bed.wan_host}:{self.bed.socks_port}"

[route]
final = "direct"

[[route.rule_sets]]
name = "bench-domains"
format = "domains"
path = "{domains}"

[[route.rule_sets]]
name = "bench-cidr"
format = "cidr"
path = "{cidr}"

[[route.rules]]
domain_suffix = ["via-proxy.example", "proxied.example.org"]
outbound = "proxy"

[[route.rules]]
rule_set = ["bench-domains"]
outbound = "proxy"

[[route.rules]]
rule_set = ["bench-cidr"]
outbound = "proxy"

[[route.rules]]
domain_keyword = ["tracker"]
outbound = "proxy"

[[route.rules]]
network = "udp"
dst_port = ["443"]
outbound = "proxy"

[firewall]
lan_interfaces = ["{self.bed.lan_if}"]
""")
        return ["-c", conf]


class XorShift:
    """A small deterministic generator (as bench/rules.rs), so every run
    loads the same rules."""

    def __init__(self, seed):
        self.x = seed

    def next(self):
        x = self.x
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        self.x = x
        return x


def rule_domains():
    """RULE_DOMAINS suffixes of two or three labels, shaped like the
    published lists; none is TLS_SNI or a suffix of it."""
    tlds = ["com", "net", "org", "cn", "io", "co.uk", "de", "jp"]
    lines = [f"s{i:x}.example{i % 97}.{tlds[i % len(tlds)]}" for i in range(RULE_DOMAINS)]
    sni_suffixes = {TLS_SNI.split(".", k)[-1] for k in range(TLS_SNI.count(".") + 1)}
    assert not sni_suffixes & set(lines)
    return "\n".join(lines) + "\n"


def rule_prefixes(bed):
    """RULE_PREFIXES IPv4 prefixes, /16 to /24, in 1.0.0.0-223.255.255.255,
    none covering an address of the bed (the target, the hops)."""
    import ipaddress

    avoid = [ipaddress.ip_address(a) for a in (bed.server, bed.wan_host)]
    avoid.append(ipaddress.ip_network(bed.remote_net, strict=False))
    rng = XorShift(0x9E3779B97F4A7C15)
    out = set()
    while len(out) < RULE_PREFIXES:
        addr = rng.next() % (223 << 24) + (1 << 24)
        net = ipaddress.ip_network((addr, 16 + rng.next() % 9), strict=False)
        if any((a in net) if not isinstance(a, ipaddress.IPv4Network) else net.overlaps(a)
               for a in avoid):
            continue
        out.add(str(net))
    return "\n".join(sorted(out)) + "\n"


class Redsocks(PeerTproxyRules, Config):
    name, label, carries, port = "redsocks", "redsocks → SOCKS5", {"tcp"}, 1084
    splice = False

    def start(self):
        conf = self.bed.dir / "redsocks.conf"
        conf.write_text(
            "base { log_debug = off; log_info = off; log = stderr; daemon = off;\n"
            "  redirector = iptables; redsocks_conn_max = 20000; rlimit_nofile = 20000; }\n"
            f"redsocks {{ local_ip = 0.0.0.0; local_port = {self.port}; ip = {self.bed.wan_host}; "
            f"port = {self.bed.socks_port};\n"
            f"  type = socks5; splice = {'true' if self.splice else 'false'}; }}\n"
        )
        self.proc = self.bed.router.spawn("redsocks", "-c", conf, log_to=self.log())
        self.bed.router.wait_listening("tcp", self.port, "redsocks")
        self.install_rules(self.port, tcp_redirect=True)



class RedsocksSplice(Redsocks):
    """redsocks with its splice option: much faster in bulk, but it keeps
    two pipes per connection, so six descriptors instead of two."""

    name, label, port = "redsocks-splice", "redsocks (splice) → SOCKS5", 1085
    splice = True
    fds_per_conn = 6


class SsRedir(PeerTproxyRules, Config):
    name, label, port = "ss-redir", "ss-redir → ss-server", 1083

    def start(self):
        self.proc = self.bed.router.spawn(
            "ss-redir", "-s", self.bed.wan_host, "-p", SS_PORT, "-b", "0.0.0.0", "-l", self.port,
            "-k", SS_KEY, "-m", SS_METHOD, "-u", "-T", "-n", "20000", log_to=self.log())
        self.bed.router.wait_listening("tcp", self.port, "ss-redir")
        self.install_rules(self.port)



class V2ray(PeerTproxyRules, Config):
    name, label, port = "v2ray", "V2Ray dokodemo → SOCKS5", 1082
    # V2Ray 4.34 relays UDP from dokodemo-door to its SOCKS5 outbound, but
    # through dante not one reply came back (the TPROXY rules take the
    # datagrams and V2Ray logs them accepted); so V2Ray is measured on TCP.
    carries = {"tcp"}

    def start(self):
        conf = self.bed.dir / "v2ray.json"
        conf.write_text(json.dumps({
            "log": {"loglevel": "warning"},
            # By default V2Ray keeps a connection for 2 s after the server
            # has closed it, which would time V2Ray's timer, not its relay.
            "policy": {"levels": {"0": {"uplinkOnly": 0}}},
            "inbounds": [{
                "listen": "0.0.0.0", "port": self.port, "protocol": "dokodemo-door",
                "settings": {"network": "tcp,udp", "followRedirect": True},
                "streamSettings": {"sockopt": {"tproxy": "tproxy"}},
            }],
            "outbounds": [{
                "protocol": "socks",
                "settings": {"servers": [{"address": self.bed.wan_host, "port": self.bed.socks_port}]},
                "streamSettings": {"sockopt": {"mark": 255}},
            }],
        }, indent=1))
        self.proc = self.bed.router.spawn("v2ray", "-config", conf, log_to=self.log())
        self.bed.router.wait_listening("tcp", self.port, "v2ray")
        self.install_rules(self.port)



class SsSet:
    """A configuration of the shadowsocks set: one method, one server."""

    tag = ""
    figures = SS_FIGURES

    @property
    def method(self):
        return SS_SET_METHODS[self.tag][0]

    def server_port(self):
        return self.bed.ss_server(*SS_SET_METHODS[self.tag])


class TproxydSs(SsSet, Tproxyd):
    """tproxyd's shadowsocks outbound (issue 20), TCP and UDP."""

    def args(self):
        conf = self.bed.dir / f"{self.name}.toml"
        conf.write_text(f"""listen = "[::]:{self.port}"

[[outbounds]]
name = "ss"
type = "shadowsocks"
server = "{self.bed.wan_host}:{self.server_port()}"
method = "{self.method}"
password = "{ss_key(self.method)}"
udp = true

[route]
final = "ss"

[firewall]
lan_interfaces = ["{self.bed.lan_if}"]
""")
        return ["-c", conf]


class SsRedirSs(SsSet, PeerTproxyRules, Config):
    """ss-redir (shadowsocks-libev) with TPROXY for TCP (-T) and UDP (-u)."""

    port = 1086

    def start(self):
        self.proc = self.bed.router.spawn(
            "ss-redir", "-s", self.bed.wan_host, "-p", self.server_port(), "-b", "0.0.0.0",
            "-l", self.port, "-k", ss_key(self.method), "-m", self.method, "-u", "-T",
            "-n", "20000", log_to=self.log())
        self.bed.router.wait_listening("tcp", self.port, "ss-redir")
        self.install_rules(self.port)


class SslocalSs(SsSet, PeerTproxyRules, Config):
    """shadowsocks-rust's sslocal in redir mode, TPROXY for TCP and UDP
    (-U: TCP and UDP, shadowsocks-rust's letters)."""

    port = 1087

    def start(self):
        bin_ = SS_RUST_BIN / "sslocal"
        if not bin_.exists():
            raise BenchError(f"{bin_} is missing: scripts/setup-test-deps builds it")
        self.proc = self.bed.router.spawn(
            bin_, "--protocol", "redir", "-b", f"0.0.0.0:{self.port}",
            "-s", f"{self.bed.wan_host}:{self.server_port()}", "-m", self.method,
            "-k", ss_key(self.method), "-U", "--tcp-redir", "tproxy", "--udp-redir", "tproxy",
            "-n", "20000", log_to=self.log())
        self.bed.router.wait_listening("tcp", self.port, "sslocal")
        self.bed.router.wait_listening("udp", self.port, "sslocal")
        self.install_rules(self.port)


def ss_set():
    """The shadowsocks set's classes, per method: tproxyd, ss-redir (AEAD
    only: same ss-server) and sslocal."""
    out = []
    for tag, (method, server) in SS_SET_METHODS.items():
        kinds = [(TproxydSs, "tproxyd-ss", "tproxyd"),
                 (SsRedirSs, "ss-redir-ss", "ss-redir"),
                 (SslocalSs, "sslocal-ss", "sslocal")]
        for base, prefix, who in kinds:
            if base is SsRedirSs and server != "ss-server":
                continue
            out.append(type(f"{base.__name__}_{tag}", (base,), {
                "tag": tag, "name": f"{prefix}-{tag}", "label": f"{who} → {server} ({method})"}))
    return out


SS_SET = ss_set()
# `--only shadowsocks` names the whole set.
GROUPS = {"shadowsocks": [c.name for c in SS_SET]}

CONFIGS = [Plain, TproxydDirect, TproxydRules, TproxydSocks, Redsocks, RedsocksSplice, SsRedir, V2ray,
           *SS_SET]
# Only when asked for by name (--only ...,tproxyd-baseline): it needs a
# second build.
OPTIONAL_CONFIGS = [TproxydBaseline]


# ---------------------------------------------------------------- measurements


def proc_status(pid, key):
    """A kB figure from /proc/PID/status (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); the split starts at 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadgen(bed, *args, timeout=120):
    r = bed.lan.sh(LOADGEN, *args, timeout=timeout)
    return json.loads(r.stdout)


def iperf(bed, *args, seconds):
    """One iperf3 run against a fresh one-shot server (a failed run cannot
    leave a busy server behind for the next configuration)."""
    server = bed.wan.spawn("iperf3", "-s", "-1", "-B", bed.server, "-p", IPERF_PORT,
                           log_to=bed.dir / "iperf3-server.log")
    try:
        bed.wan.wait_listening("tcp", IPERF_PORT, "iperf3 server")
        r = bed.lan.sh("iperf3", "-c", bed.server, "-p", IPERF_PORT, "-t", seconds, "-J", *args,
                       check=False, timeout=seconds + 30)
        data = json.loads(r.stdout) if r.stdout.strip() else {}
        if r.returncode != 0 or "error" in data:
            raise BenchError(f"iperf3 {' '.join(map(str, args))}: {data.get('error', r.stderr.strip())}")
        return data
    finally:
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def measure(bed, cfg, p):
    """All figures of one configuration in one round: {figure: value}."""
    out = {}
    pid = cfg.proc.pid if cfg.proc else None
    target = f"{bed.server}:{RR_PORT}"

    def want(key):
        return cfg.supports(key) and chosen(p, key)

    # A first exchange proves the path works before anything is timed.
    loadgen(bed, "tcp-lat", "--target", target, "--count", 5)
    if cfg.supports("udp_p50"):
        loadgen(bed, "udp-lat", "--target", target, "--count", 5)

    if want("tcp_p50"):
        lat = loadgen(bed, "tcp-lat", "--target", target, "--count", p.lat_count)
        out["tcp_p50"], out["tcp_p99"] = lat["p50_us"], lat["p99_us"]
    if want("tls_p50"):
        lat = loadgen(bed, "tcp-lat", "--target", target, "--count", p.lat_count, "--tls", TLS_SNI)
        out["tls_p50"], out["tls_p99"] = lat["p50_us"], lat["p99_us"]
    if want("udp_p50"):
        lat = loadgen(bed, "udp-lat", "--target", target, "--count", p.lat_count)
        out["udp_p50"], out["udp_p99"] = lat["p50_us"], lat["p99_us"]

    # The connection rate, and the proxy's CPU time per connection: on
    # shared cores the rate follows the neighbours' load, the CPU time
    # much less so.
    for key, cpu_key, extra in (("crr", "cpu_per_conn", []),
                                ("crr_tls", "cpu_per_tls_conn", ["--tls", TLS_SNI])):
        if not want(key):
            continue
        cpu0 = cpu_seconds(pid) if pid else 0
        crr = loadgen(bed, "tcp-crr", "--target", target, "--concurrency", 64, "--seconds", p.seconds,
                      *extra)
        out[key] = crr["conns_per_s"]
        if pid and crr["conns"]:
            out[cpu_key] = (cpu_seconds(pid) - cpu0) / crr["conns"] * 1e6
    if want("udp_rr"):
        rr = loadgen(bed, "udp-rr", "--target", target, "--sockets", 64, "--seconds", p.seconds)
        out["udp_rr"] = rr["exchanges_per_s"]
    if want("udp_bulk"):
        data = iperf(bed, "-u", "-b", p.udp_rate, "-l", 1400, seconds=p.seconds)
        s = data["end"]["sum"]
        out["udp_loss"] = s["lost_percent"]
        out["udp_bulk"] = s["bits_per_second"] * (1 - s["lost_percent"] / 100) / 1e6
    if want("udp_down"):
        # The server sends, the client receives: replies, the direction
        # most of a router's UDP (video, QUIC downloads) goes.
        data = iperf(bed, "-u", "-R", "-b", p.udp_rate, "-l", 1400, seconds=p.seconds)
        s = data["end"]["sum"]
        out["udp_down"] = s["bits_per_second"] * (1 - s["lost_percent"] / 100) / 1e6

    if want("tcp1"):
        cpu0 = cpu_seconds(pid) if pid else 0
        moved = 0
        for streams, key in ((1, "tcp1"), (8, "tcp8")):
            data = iperf(bed, "-P", streams, seconds=p.seconds)
            recv = data["end"]["sum_received"]
            out[key] = recv["bits_per_second"] / 1e9
            moved += recv["bytes"]
        if pid:
            out["cpu_per_gib"] = (cpu_seconds(pid) - cpu0) / (moved / 2**30)
    if pid:
        out["peak_rss"] = proc_status(pid, "VmHWM") / 1024
        out["rss"] = proc_status(pid, "VmRSS") / 1024
    if want("idle_rss"):
        out["idle_rss"] = idle_rss_per_connection(bed, cfg, p)
    if want("flood_rss"):
        out["flood_rss"] = udp_flood_rss(bed, cfg, p)
    return out


def udp_flood_rss(bed, cfg, p):
    """RSS growth (MiB) of a fresh process after one datagram from each of
    p.flood new client ports: a bounded session table keeps it flat."""
    cfg.stop()
    bed.settle()
    cfg.start()
    pid = cfg.proc.pid
    target = f"{bed.server}:{RR_PORT}"
    loadgen(bed, "udp-lat", "--target", target, "--count", 5)
    before = proc_status(pid, "VmRSS")
    loadgen(bed, "udp-flood", "--target", target, "--ports", p.flood)
    time.sleep(1)
    return (proc_status(pid, "VmRSS") - before) / 1024


def idle_count(cfg, p):
    """The idle connections a configuration can hold within the machine's
    descriptor limit (room kept for everything else)."""
    return min(p.idle, (p.nofile - 1000) // cfg.fds_per_conn)


def idle_rss_per_connection(bed, cfg, p):
    """RSS added per idle TCP connection, in KiB, on a fresh process (so
    memory freed by the earlier tests cannot hide the cost)."""
    cfg.stop()
    bed.settle()
    cfg.start()
    pid = cfg.proc.pid
    target = f"{bed.server}:{RR_PORT}"
    count = idle_count(cfg, p)
    loadgen(bed, "tcp-lat", "--target", target, "--count", 5)
    before = proc_status(pid, "VmRSS")
    holder = bed.lan.spawn(LOADGEN, "hold", "--target", target, "--count", count,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = holder.stdout.readline()
        if not line:
            raise BenchError("loadgen hold ended before opening its connections")
        held = json.loads(line)
        if held["open"] < count * 0.99:
            raise BenchError(f"only {held['open']} of {count} idle connections opened")
        time.sleep(1)
        return (proc_status(pid, "VmRSS") - before) / held["open"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


# ---------------------------------------------------------------- report


def summarize(samples):
    """{config: {figure: (median, spread%, n)}} from per-round samples."""
    table = {}
    for cfg, rounds in samples.items():
        table[cfg] = {}
        for key, *_ in FIGURES:
            vals = [r[key] for r in rounds if key in r]
            if vals:
                med = statistics.median(vals)
                spread = (max(vals) - min(vals)) / med * 100 if med else 0.0
                table[cfg][key] = (med, spread, len(vals))
    return table


def comparable(table, cfg, key):
    """The value a comparison uses: latency as added to plain routing."""
    if key not in table.get(cfg, {}):
        return None
    v = table[cfg][key][0]
    if key in ADDED:
        base = table.get("plain", {}).get(key)
        if base is None:
            return None
        v = max(v - base[0], 0.0)
    return v


def ratio(table, a, b, key):
    """How many times better `a` is than `b` (>1 means a is better)."""
    va, vb = comparable(table, a, key), comparable(table, b, key)
    if va is None or vb is None:
        return None
    if FIGURE[key][3] == "higher":
        return va / vb if vb else None
    # Lower is better: the inverse, so every ratio reads the same way.
    # A floor of 1 µs / 0.01 % keeps "adds nothing" from dividing by zero.
    floor = 0.01 if key == "udp_loss" else (1.0 if key in ADDED else 1e-9)
    return max(vb, floor) / max(va, floor)


PEERS = ["redsocks", "redsocks-splice", "ss-redir", "v2ray"]
# The peers that relay through the same dante as tproxyd → SOCKS5; ss-redir
# has its own upstream (ss-server), which is faster than dante at new
# connections, so it is not a like-for-like comparison of the proxies.
SOCKS_PEERS = ["redsocks", "redsocks-splice", "v2ray"]


def best_peer(table, key, peers=PEERS):
    best = None
    for peer in peers:
        v = comparable(table, peer, key)
        if v is None:
            continue
        if best is None or ratio(table, peer, best, key) > 1:
            best = peer
    return best


# Facts about the configurations that the numbers alone do not tell.
NOTES = [
    "ss-redir does not use dante: it relays to ss-server, which accepts new connections "
    "faster than dante does, so its connection-rate and TCP-latency figures compare "
    "upstreams as much as proxies; the column \"best SOCKS5 peer\" compares like with "
    "like. It also encrypts (aes-128-gcm), so its bulk and CPU figures include that work.",
    "The UDP flood figure depends on how many sessions each proxy keeps: tproxyd keeps up "
    "to 4,096 (limits.udp_sessions), about 2 KiB each; shadowsocks-libev's client side "
    "keeps a UDP cache fixed at a few hundred entries in its source and drops older "
    "sessions, so it grows less but forgets clients sooner.",
    "V2Ray 4.34 relayed no UDP replies through dante in this bed (the datagrams reached "
    "it); it is measured on TCP only. Its keep-alive after the server closes "
    "(policy uplinkOnly) is set to 0, or each short exchange would wait for that timer "
    "(about a second here).",
    "redsocks appears twice: with its default settings, and with its splice option, "
    "faster in bulk but six descriptors per connection, so it held fewer idle connections "
    "within the descriptor limit (per-connection memory is compared all the same).",
    "Peak RSS counts the pages of the program and its libraries read from disk. Of "
    "tproxyd's 4.3 MiB at rest, 3.9 MiB are such clean, shareable pages (its own code "
    "1.9, libc 1.3, libm 0.5, the loader 0.2) and 0.45 MiB its own memory; redsocks is "
    "a much smaller program.",
    "Bulk figures vary a lot between rounds (see ±): the iperf3 client and server, the "
    "proxy and the kernel's forwarding all share two cores.",
    "UDP bulk loss is what the iperf3 receiver counts. Through tproxyd direct it happens at "
    "the iperf3 server's socket in the WAN namespace (its receive-buffer error counter "
    "grows), not at tproxyd's listener, whose counter stays at 0: on two shared cores the "
    "receiving iperf3 does not get CPU time soon enough. Runs of same-size datagrams "
    "leave tproxyd with UDP segmentation offload both ways: uploads from the inbound, "
    "downloads (iperf3 -R) from the reply sockets.",
]


def fmt(v):
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def machine():
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    versions = {}
    for pkg in ["iperf3", "redsocks", "shadowsocks-libev", "v2ray", "dante-server"]:
        r = run(["dpkg-query", "-W", "-f", "${Version}", pkg], check=False)
        versions[pkg] = r.stdout.strip() or "?"
    ssserver = SS_RUST_BIN / "ssserver"
    if ssserver.exists():
        words = run([ssserver, "--version"], check=False).stdout.split()
        versions["shadowsocks-rust"] = words[-1] if words else "?"
    tp = run([TPROXYD, "--version"], check=False).stdout.strip()
    commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem, 1),
        "kernel": platform.release(), "versions": versions,
        "tproxyd": f"{tp} ({commit})" if commit else tp,
    }


def report(table, p, info, samples):
    lines = [
        "# tproxyd benchmark results",
        "",
        f"Run on {info['date']} with `bench/run` ({p.rounds} rounds, {p.seconds} s per "
        f"throughput/rate test, configurations in rotating order each round).",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB, "
        f"Linux {info['kernel']}. The client, the router and the servers share these cores.",
        f"- Software: {info['tproxyd']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
        f"- Topology: three network namespaces joined by veth (LAN client, router with the "
        f"proxy, WAN with the servers, dante and ss-server). IPv4. Every SOCKS5 path uses the "
        f"same dante; ss-redir uses ss-server with {SS_METHOD} (shadowsocks has no "
        f"unencrypted mode).",
        f"- Idle connections for the memory figure: {p.idle} asked; the machine's hard "
        f"descriptor limit is {p.nofile}, so "
        + (", ".join(f"{c.name} held {idle_count(c, p)}" for c in CONFIGS
                     if c.proxy and c not in SS_SET and c.name in samples) or "none was measured")
        + " (a proxy holds two descriptors per connection, redsocks with splice six).",
        f"- UDP bulk: iperf3 at {p.udp_rate}bit/s offered, 1400-byte datagrams.",
        f"- UDP flood: one datagram from each of {p.flood:,} new client ports, on a fresh "
        f"process; tproxyd's session table is capped at 4,096 (its default).",
        "",
        "Each cell is the median of the rounds, with the spread (max−min, as % of "
        "the median) after ±. — means the configuration does not carry that traffic "
        "or has no process of its own to measure.",
        "",
    ]
    # The configurations this run measured (all of them in a full run).
    # The shadowsocks set has its own section (shadowsocks_section).
    names = [c.name for c in CONFIGS if c.name in samples and c not in SS_SET]
    labels = {c.name: c.label for c in CONFIGS}
    if names:
        lines.append("| figure | " + " | ".join(labels[n] for n in names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for key, title, unit, better, _ in FIGURES:
            cells = []
            for n in names:
                cell = table.get(n, {}).get(key)
                if cell is None:
                    cells.append("—")
                else:
                    med, spread, _n = cell
                    cells.append(f"{fmt(med)} ±{spread:.0f}%")
            arrow = "↑" if better == "higher" else "↓"
            lines.append(f"| {title} ({unit}) {arrow} | " + " | ".join(cells) + " |")

    lines += rules_section(table, samples)
    lines += baseline_section(table, samples)
    lines += shadowsocks_section(table, samples, info)
    if not any(n in table for n in ["plain", *PEERS]):
        # A subset without plain routing and peers: nothing to compare with.
        return "\n".join(lines + failed_runs(samples) + [""])
    lines += [
        "",
        "## Ratios",
        "",
        "Every ratio reads \"times better\": above 1 tproxyd is ahead. For latency the "
        "ratio compares the latency each proxy *adds* to plain routing; for loss, memory "
        "and CPU it is the peer's figure over tproxyd's. The fair peer comparison is "
        "tproxyd → SOCKS5, since every peer also relays through an upstream; tproxyd "
        "direct is shown against plain routing. Target: ≥ 0.9× plain routing for direct "
        "TCP bulk; ≥ 1.3× the best peer for every figure.",
        "",
        "| figure | direct ÷ plain | best peer | tproxyd → SOCKS5 vs best peer | best SOCKS5 peer (same dante) | tproxyd → SOCKS5 vs it | tproxyd direct vs best peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, title, *_ in FIGURES:
        vs_plain = ratio(table, "tproxyd-direct", "plain", key) if key in ("tcp1", "tcp8", "crr", "udp_rr", "udp_bulk", "udp_down") else None
        peer = best_peer(table, key)
        socks = ratio(table, "tproxyd-socks5", peer, key) if peer else None
        direct = ratio(table, "tproxyd-direct", peer, key) if peer else None
        speer = best_peer(table, key, SOCKS_PEERS)
        ssocks = ratio(table, "tproxyd-socks5", speer, key) if speer else None

        def mark(r, target):
            if r is None:
                return "—"
            return f"{r:.2f}× {'✅' if r >= target else '❌'}"

        lines.append(
            f"| {title} | {mark(vs_plain, 0.9) if vs_plain is not None else '—'} | "
            f"{labels.get(peer, '—') if peer else '—'} | {mark(socks, 1.3)} | "
            f"{labels.get(speer, '—') if speer else '—'} | {mark(ssocks, 1.3)} | {mark(direct, 1.3)} |"
        )
    lines += ["", "## Reading these figures", ""] + [f"- {n}" for n in NOTES]
    lines += failed_runs(samples)
    lines += ["", "![ratios](ratios.png)", ""]
    return "\n".join(lines)


def failed_runs(samples):
    failures = [(cfg, r["error"]) for cfg, rounds in samples.items() for r in rounds if "error" in r]
    if not failures:
        return []
    return ["", "## Runs that failed", ""] + [f"- {cfg}: {err}" for cfg, err in failures]


def paired(samples, a, b, key):
    """Per-round ratios a/b of one figure: rounds measure the two back to
    back, so a drift of the machine cancels within a pair."""
    return [ra[key] / rb[key] for ra, rb in zip(samples.get(a, []), samples.get(b, []))
            if key in ra and key in rb and rb[key]]


def rules_section(table, samples, a="tproxyd-rules", b="tproxyd-direct"):
    """Issue 9's figures: what 110k rules cost tproxyd direct."""
    if a not in table or b not in table:
        return []
    ta, tb = table[a], table[b]
    lines = ["", "## The rules' cost (issue 9)", "",
             f"{a} against {b}: the same relay, plus {RULE_DOMAINS:,} domain suffixes and "
             f"{RULE_PREFIXES:,} prefixes in rule sets and five plain rules, none matching the "
             f"bench's flows (every flow is looked up in full and goes to final = direct). "
             f"Domain rules make tproxyd sniff each new TCP flow's first bytes; the clients send "
             f"first (a 64-byte request, or a 517-byte TLS ClientHello naming {TLS_SNI}). "
             f"Ratios are of the medians (\"paired\": the median and range of the per-round "
             f"ratios, each round measuring both back to back). Target: new connections "
             f"≥ 0.95× without rules.", ""]
    summary = []
    for key, what in (("crr", "crr"), ("crr_tls", "TLS crr")):
        if key in ta and key in tb:
            r = ta[key][0] / tb[key][0]
            pr = paired(samples, a, b, key)
            span = f", paired {statistics.median(pr):.3f} [{min(pr):.3f}–{max(pr):.3f}]" if pr else ""
            lines.append(f"- {FIGURE[key][1]}: {fmt(ta[key][0])} ±{ta[key][1]:.0f}% against "
                         f"{fmt(tb[key][0])} ±{tb[key][1]:.0f}% conn/s: **{r:.3f}×** {b}{span} "
                         f"{'✅' if r >= 0.95 else '❌'}")
            summary.append(f"{what} {r:.2f}× {b}")
    for key in ("cpu_per_conn", "cpu_per_tls_conn"):
        if key in ta and key in tb:
            d = ta[key][0] - tb[key][0]
            pr = paired(samples, a, b, key)
            span = f", paired {statistics.median(pr):.3f}× [{min(pr):.3f}–{max(pr):.3f}]" if pr else ""
            lines.append(f"- {FIGURE[key][1]}: {fmt(ta[key][0])} ±{ta[key][1]:.0f}% against "
                         f"{fmt(tb[key][0])} ±{tb[key][1]:.0f}% µs: the rules add **{d:+.1f} µs** "
                         f"({ta[key][0] / tb[key][0]:.3f}×{span})")
            summary.append(f"CPU/conn {'TLS ' if 'tls' in key else ''}{d:+.1f} µs")
    for key in ("tcp_p50", "tcp_p99", "tls_p50", "tls_p99"):
        if key in ta and key in tb:
            d = ta[key][0] - tb[key][0]
            pd = [ra[key] - rb[key] for ra, rb in zip(samples[a], samples[b])
                  if key in ra and key in rb]
            span = f"; paired {statistics.median(pd):+.1f} [{min(pd):+.0f}…{max(pd):+.0f}]" if pd else ""
            lines.append(f"- {FIGURE[key][1]}: {fmt(ta[key][0])} ±{ta[key][1]:.0f}% against "
                         f"{fmt(tb[key][0])} ±{tb[key][1]:.0f}% µs: the rules add **{d:+.1f} µs** "
                         f"({ta[key][0] / tb[key][0]:.3f}×{span})")
            if key.startswith("tls"):
                summary.append(f"TLS {key[4:]} {d:+.0f} µs")
    for key, what in (("peak_rss", "peak RSS"), ("rss", "RSS after the tests")):
        if key in ta and key in tb:
            d = ta[key][0] - tb[key][0]
            lines.append(f"- {FIGURE[key][1]}: {fmt(ta[key][0])} against {fmt(tb[key][0])} MiB: "
                         f"the rules add **{d:+.1f} MiB**")
            summary.append(f"{d:+.1f} MiB {what}")
    if summary:
        lines += ["", "rules: " + ", ".join(summary)]
    return lines


def ss_ratio(table, a, b, key):
    """How many times better `a` is than `b` on the raw medians (>1: a is
    better); None when either is missing."""
    va, vb = table.get(a, {}).get(key), table.get(b, {}).get(key)
    if va is None or vb is None:
        return None
    va, vb = va[0], vb[0]
    if FIGURE[key][3] == "higher":
        return va / vb if vb else None
    floor = 0.01 if key == "udp_loss" else 1e-9
    return max(vb, floor) / max(va, floor)


def shadowsocks_section(table, samples, info):
    """Issue 20: per method, tproxyd's shadowsocks outbound against
    ss-redir and sslocal (redir mode) relaying to the same server."""
    if not any(c.name in table for c in SS_SET):
        return []
    when = info.get("dates", {})
    lines = ["", "## Shadowsocks: tproxyd against ss-redir and sslocal (issue 20)", "",
             "Each client relays to the same server with the same method, in the same rounds: "
             "ss-server (shadowsocks-libev) for the AEAD methods, ssserver (shadowsocks-rust) for "
             "2022, which ss-server lacks (so only sslocal compares there). tproxyd and ss-redir "
             "capture with TPROXY, sslocal in its redir mode with `--tcp-redir tproxy "
             "--udp-redir tproxy`. \"vs\" reads times better than the peer that is best on that "
             "figure: the faster for speed, the leaner for CPU and memory. Targets: speed ≥ 1.0× "
             "the faster peer, proxy CPU per GiB and per connection ≤ the leaner (≥ 1.0× here), "
             "peak RSS ≤ sslocal's."]
    dates = sorted({when[c.name] for c in SS_SET if c.name in when})
    if dates:
        lines += ["", f"Measured on {', '.join(dates)}."]
    for tag, (method, server) in SS_SET_METHODS.items():
        names = [c.name for c in SS_SET if c.tag == tag and c.name in table]
        if not names:
            continue
        ours = f"tproxyd-ss-{tag}"
        peers = [n for n in names if n != ours]
        labels = {c.name: c.label.split(" → ")[0] for c in SS_SET}
        lines += ["", f"### {method} → {server}", "",
                  "| figure | " + " | ".join(labels[n] for n in names)
                  + " | best peer | tproxyd vs it | target |",
                  "|---|" + "---|" * (len(names) + 3)]
        for key, title, unit, better, _ in FIGURES:
            if key not in SS_FIGURES:
                continue
            cells = []
            for n in names:
                cell = table.get(n, {}).get(key)
                cells.append("—" if cell is None else f"{fmt(cell[0])} ±{cell[1]:.0f}%")
            best = None
            for peer in peers:
                if key in table.get(peer, {}) and (best is None or ss_ratio(table, peer, best, key) > 1):
                    best = peer
            # RSS is held to sslocal's, whichever peer is leaner.
            if key in ("peak_rss", "rss") and f"sslocal-ss-{tag}" in table:
                best = f"sslocal-ss-{tag}"
            r = ss_ratio(table, ours, best, key) if best else None
            target = "" if key in ("udp_loss", "rss") else (
                "—" if r is None else ("✅" if r >= 1.0 else "❌"))
            arrow = "↑" if better == "higher" else "↓"
            lines.append(f"| {title} ({unit}) {arrow} | " + " | ".join(cells)
                         + f" | {labels.get(best, '—') if best else '—'} | "
                         + (f"{r:.2f}×" if r is not None else "—") + f" | {target} |")
    return lines


def baseline_section(table, samples, a="tproxyd-direct", b="tproxyd-baseline"):
    """Issue 11's figures: this build against an earlier one, same flows."""
    if a not in table or b not in table:
        return []
    ta, tb = table[a], table[b]
    lines = ["", "## Against the baseline build (issue 11)", "",
             f"{a} (this build: every flow in the registry, byte counters, the policy behind "
             f"an atomic swap) against {b} (the build before them), both direct, measured back "
             f"to back in each round. Ratios of the medians; \"paired\": median and range of the "
             f"per-round ratios. Target: ≥ 0.97× (the registry costs at most 3%).", ""]
    summary = []
    for key in ("tcp1", "tcp8", "crr", "crr_tls", "udp_rr"):
        if key in ta and key in tb:
            r = ta[key][0] / tb[key][0]
            pr = paired(samples, a, b, key)
            span = f", paired {statistics.median(pr):.3f} [{min(pr):.3f}–{max(pr):.3f}]" if pr else ""
            lines.append(f"- {FIGURE[key][1]}: {fmt(ta[key][0])} ±{ta[key][1]:.0f}% against "
                         f"{fmt(tb[key][0])} ±{tb[key][1]:.0f}%: **{r:.3f}×**{span} "
                         f"{'✅' if r >= 0.97 else '❌'}")
            summary.append(f"{key} {r:.3f}×")
    for key in ("cpu_per_conn", "cpu_per_gib"):
        if key in ta and key in tb:
            lines.append(f"- {FIGURE[key][1]}: {fmt(ta[key][0])} against {fmt(tb[key][0])}: "
                         f"{ta[key][0] / tb[key][0]:.3f}×")
    if summary:
        lines += ["", "baseline: " + ", ".join(summary)]
    return lines


def chart(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f[0] for f in FIGURES]
    titles = [FIGURE[k][1] for k in keys]
    series = []
    for who, colour in (("tproxyd-socks5", "#1f77b4"), ("tproxyd-direct", "#9ecae1")):
        vals = []
        for k in keys:
            peer = best_peer(table, k)
            r = ratio(table, who, peer, k) if peer else None
            vals.append(r if r is not None else 0)
        series.append((who, colour, vals))
    fig, ax = plt.subplots(figsize=(9, 6.5))
    h = 0.38
    for i, (who, colour, vals) in enumerate(series):
        ys = [j + (i - 0.5) * h for j in range(len(keys))]
        ax.barh(ys, vals, height=h, color=colour, label=f"{who} ÷ best peer")
        for y, v in zip(ys, vals):
            if v:
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="grey", lw=1)
    ax.axvline(1.3, color="green", lw=1, ls="--", label="target 1.3×")
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels(titles, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("times better than the best peer (log scale; >1 = tproxyd ahead)")
    ax.set_title("tproxyd against the best peer per figure (median of rounds)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def merged(old, samples, info, p):
    """--merge: this run's samples replace only their configurations' in
    an earlier results.json. The earlier run's header (machine, date,
    parameters) stays; each configuration keeps the date it was measured on."""
    old_info = old.get("machine", info)
    dates = {n: old_info.get("dates", {}).get(n, old_info.get("date", "?"))
             for n in old.get("samples", {})}
    for key, value in old.get("params", {}).items():
        setattr(p, key, value)
    return ({**old.get("samples", {}), **samples},
            {**old_info, "dates": {**dates, **info["dates"]}})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="length of each throughput/rate test")
    ap.add_argument("--idle", type=int, default=10000, help="idle TCP connections for the memory test")
    ap.add_argument("--lat-count", type=int, default=2000, help="exchanges per latency test")
    ap.add_argument("--flood", type=int, default=20000, help="new UDP client ports in the flood test")
    ap.add_argument("--udp-rate", default="1G", help="iperf3 offered UDP rate")
    ap.add_argument("--only", help="comma-separated configurations to run (default: all); "
                    "'shadowsocks' names the shadowsocks set (" + ", ".join(GROUPS["shadowsocks"]) + ")")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other configurations' samples of OUT/results.json: this run's "
                         "replace only their own, and RESULTS.md is written from the whole (e.g. "
                         "--only shadowsocks --merge refreshes that section alone)")
    ap.add_argument("--figures", type=lambda v: set(v.split(",")),
                    help="comma-separated figures to measure, by their results.json keys "
                         "(tcp_p50 brings tcp_p99, udp_bulk udp_loss, tcp1 tcp8 and cpu_per_gib); "
                         "default: all. For quick comparisons while developing.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench", help="where RESULTS.md and the chart go")
    ap.add_argument("--report", type=Path,
                    help="write the Markdown report here and the samples next to it (same name, "
                         ".json), without the chart, instead of OUT/RESULTS.md, results.json and "
                         "ratios.png: for a subset that must not replace the full run's files")
    ap.add_argument("--from-json", type=Path,
                    help="write RESULTS.md and the chart again from an earlier results.json, measuring nothing")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny run of every configuration and figure; fails if any figure is missing")
    p = ap.parse_args()
    unknown = (p.figures or set()) - set(FIGURE)
    if unknown:
        ap.error(f"--figures: unknown {', '.join(sorted(unknown))}; known: {', '.join(FIGURE)}")
    if p.smoke:
        p.rounds, p.seconds, p.idle, p.lat_count, p.udp_rate, p.flood = 1, 1, 200, 50, "50M", 500
    if p.from_json:
        saved = json.loads(p.from_json.read_text())
        for key, value in saved.get("params", {}).items():
            setattr(p, key, value)
        table = summarize(saved["samples"])
        p.out.mkdir(parents=True, exist_ok=True)
        (p.out / "RESULTS.md").write_text(report(table, p, saved["machine"], saved["samples"]))
        chart(table, p.out / "ratios.png")
        return 0
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces); run it through bench/run")
    for need in (TPROXYD, LOADGEN):
        if not need.exists():
            sys.exit(f"bench: {need} is missing; bench/run builds it (cargo build --release --example loadgen)")
    # SIGTERM (a CI timeout, kill) must still remove the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))
    max_nofile()
    p.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for cls in CONFIGS:
        if cls.proxy and idle_count(cls, p) < p.idle:
            log(f"descriptor limit {p.nofile}: {cls.name} holds {idle_count(cls, p)} idle connections, not {p.idle}")
    only = [n for word in p.only.split(",") for n in GROUPS.get(word, [word])] if p.only else None
    unknown = set(only or []) - {c.name for c in CONFIGS + OPTIONAL_CONFIGS}
    if unknown:
        ap.error(f"--only: unknown {', '.join(sorted(unknown))}; known: "
                 + ", ".join([*GROUPS, *(c.name for c in CONFIGS + OPTIONAL_CONFIGS)]))
    wanted = [c for c in CONFIGS if not only or c.name in only]
    wanted += [c for c in OPTIONAL_CONFIGS if only and c.name in only]
    workdir = Path(tempfile.mkdtemp(prefix="tproxyd-bench-"))
    info = machine()
    info["date"] = datetime.date.today().isoformat()
    samples = {c.name: [] for c in wanted}
    bed = Bed(workdir)
    try:
        for rnd in range(p.rounds):
            shift = rnd % len(wanted)
            order = wanted[shift:] + wanted[:shift]
            for cls in order:
                cfg = cls(bed)
                log(f"round {rnd + 1}/{p.rounds}: {cfg.name}")
                try:
                    cfg.start()
                    figures = measure(bed, cfg, p)
                    log("  " + ", ".join(f"{k}={fmt(v)}" for k, v in figures.items()))
                    samples[cfg.name].append(figures)
                except (BenchError, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as e:
                    log(f"  {cfg.name} failed: {e}; its log: {cfg.log()}")
                    samples[cfg.name].append({"error": str(e)})
                finally:
                    cfg.stop()
                    bed.settle()
    finally:
        bed.close()
    info["dates"] = {c.name: info["date"] for c in wanted}
    if p.merge and (p.out / "results.json").exists():
        samples, info = merged(json.loads((p.out / "results.json").read_text()), samples, info, p)
    table = summarize(samples)
    params = {k: getattr(p, k) for k in ("rounds", "seconds", "idle", "nofile", "udp_rate", "flood")}
    saved = json.dumps({"machine": info, "params": params, "samples": samples}, indent=1) + "\n"
    if p.report:
        p.report.parent.mkdir(parents=True, exist_ok=True)
        p.report.with_suffix(".json").write_text(saved)
        p.report.write_text(report(table, p, info, samples))
        log(f"wrote {p.report} and {p.report.with_suffix('.json')}; logs in {workdir}")
    else:
        p.out.mkdir(parents=True, exist_ok=True)
        (p.out / "results.json").write_text(saved)
        (p.out / "RESULTS.md").write_text(report(table, p, info, samples))
        chart(table, p.out / "ratios.png")
        log(f"wrote {p.out / 'RESULTS.md'} and {p.out / 'ratios.png'}; logs in {workdir}")
    missing = [
        f"{c.name}: {key}"
        for c in wanted
        for key, *_ in FIGURES
        if Config.supports(c(bed), key) and chosen(p, key) and key not in table.get(c.name, {})
    ]
    if missing:
        log("figures missing (see the logs above): " + "; ".join(missing))
        return 1
    if not p.smoke:
        return 0
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
