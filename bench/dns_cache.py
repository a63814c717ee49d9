#!/usr/bin/env python3
"""tproxyd's DNS answering (issue 21): its cache against dnsdist's packet
cache and dnsmasq's, and uncached forwarding through a SOCKS5 and a
shadowsocks outbound, with dnsperf.

Everything runs in one network namespace of its own with only `lo` up, so
no query can leave the machine:

  resolver  loadgen dns-serve on 127.0.0.1:15300 (UDP and TCP; every A is
            127.0.0.1, TTL 3600)
  tproxyd   dns.listen 127.0.0.1:15353, one [[dns.servers]] udp:// to the
            resolver through `direct` (cached figures) or through dante /
            ss-server on loopback with the cache off (uncached figures)
  dnsdist   1.7 with a packet cache, 127.0.0.1:15354
  dnsmasq   --cache-size 10000, 127.0.0.1:15355

Figures, per server, medians over rounds (the order rotates per round):
  qps       cached queries per second at saturation (dnsperf, 1,000 names
            asked over and over after one warm-up pass, 100 outstanding)
  p99       99th percentile latency at half of dnsdist's saturation rate
            (dnsperf -Q, every query's latency from -v)
  rss       tproxyd's RSS after start, after the latency run (1,000 names),
            and after 100,000 distinct names were cached
  fwd       uncached forwarding, queries per second and p99, direct vs
            through dante (SOCKS5 UDP ASSOCIATE) and ss-server (aes-128-gcm)

Numbers only; nothing here passes or fails on time.

  sudo bench/run --dns-cache [--seconds 10] [--rounds 3] [--smoke]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import LOADGEN, TPROXYD, BenchError, Netns, log, proc_status, run  # noqa: E402

RESOLVER = "127.0.0.1:15300"
PORTS = {"tproxyd": 15353, "dnsdist": 15354, "dnsmasq": 15355}
SOCKS_PORT, SS_PORT = 11080, 18388
SS_KEY = "bench-dns-password"


def names_file(path, count, prefix):
    path.write_text("".join(f"{prefix}{i}.example. A\n" for i in range(count)))
    return path


def tproxyd_config(path, outbound, cache=True, entries=200_000):
    outbounds = {
        "direct": '[[outbounds]]\nname = "up"\ntype = "direct"\n',
        "socks5": f'[[outbounds]]\nname = "up"\ntype = "socks5"\nserver = "127.0.0.1:{SOCKS_PORT}"\n',
        "shadowsocks": (
            f'[[outbounds]]\nname = "up"\ntype = "shadowsocks"\nserver = "127.0.0.1:{SS_PORT}"\n'
            f'method = "aes-128-gcm"\npassword = "{SS_KEY}"\n'
        ),
    }[outbound]
    path.write_text(
        'listen = "127.0.0.1:11090"\nudp = false\n'
        f"{outbounds}"
        '[firewall]\nbackend = "none"\n'
        f'[dns]\nlisten = ["127.0.0.1:{PORTS["tproxyd"]}"]\n'
        f'[[dns.servers]]\nname = "r"\naddress = "udp://{RESOLVER}"\noutbound = "up"\n'
        f"[dns.cache]\nenabled = {'true' if cache else 'false'}\nmax_entries = {entries}\n"
        f"max_bytes = {64 << 20}\n"
    )
    return path


def dnsperf(ns, port, data, seconds, qps=None, verbose=False):
    args = ["dnsperf", "-s", "127.0.0.1", "-p", port, "-d", data, "-l", seconds, "-c", 4, "-q", 100]
    if qps:
        args += ["-Q", qps]
    if verbose:
        args += ["-v"]
    r = ns.sh(*args, timeout=seconds + 30)
    out = r.stdout
    found = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    if not found:
        raise BenchError(f"dnsperf printed no rate: {out[-500:]} {r.stderr[-500:]}")
    result = {"qps": float(found.group(1)), "lost": int(lost.group(1)) if lost else None}
    if verbose:
        # "> NOERROR name.example. A 0.000123" per answered query.
        lat = sorted(float(m) for m in re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))
        if lat:
            result["p50_us"] = lat[len(lat) // 2] * 1e6
            result["p99_us"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6
    return result


class Servers:
    """The resolver and the caches under test, in one namespace."""

    def __init__(self, ns, work):
        self.ns, self.work, self.procs = ns, work, {}

    def start(self, name, *args, proto="udp", port=None):
        p = self.ns.spawn(*args, log_to=self.work / f"{name}.log")
        self.procs[name] = p
        self.ns.wait_listening(proto, port, name)
        return p

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()

    def stop_all(self):
        for name in list(self.procs):
            self.stop(name)

    def tproxyd(self, outbound="direct", cache=True):
        cfg = tproxyd_config(self.work / f"tproxyd-{outbound}.toml", outbound, cache)
        return self.start("tproxyd", TPROXYD, "run", "-c", cfg, port=PORTS["tproxyd"])

    def dnsdist(self):
        conf = self.work / "dnsdist.conf"
        conf.write_text(
            f'setLocal("127.0.0.1:{PORTS["dnsdist"]}")\n'
            f'newServer({{address="{RESOLVER}"}})\n'
            "pc = newPacketCache(200000, {maxTTL=86400})\n"
            'getPool(""):setCache(pc)\n'
            # No query to the outside world: dnsdist polls a public name
            # for security notices unless told not to.
            'setSecurityPollSuffix("")\n'
        )
        return self.start("dnsdist", "dnsdist", "--supervised", "--disable-syslog", "-C", conf,
                          port=PORTS["dnsdist"])

    def dnsmasq(self):
        return self.start("dnsmasq", "dnsmasq", "-k", f"--port={PORTS['dnsmasq']}",
                          "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv",
                          "--no-hosts", f"--server={RESOLVER.replace(':', '#')}",
                          "--cache-size=10000", "--user=root", "--pid-file=",
                          port=PORTS["dnsmasq"])


def cached_round(srv, which, names, seconds):
    """One saturation run and one half-rate latency run against `which`."""
    port = PORTS[which]
    dnsperf(srv.ns, port, names, 2)  # warm-up: every name asked once
    sat = dnsperf(srv.ns, port, names, seconds)
    return sat


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="one short round")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    a = ap.parse_args()
    if a.smoke:
        a.rounds, a.seconds = 1, 1
    for tool in ("dnsperf", "dnsdist", "dnsmasq"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} is missing: bench/run --dns-cache installs it (apt)")
    work = Path(tempfile.mkdtemp(prefix="tproxyd-dns-cache-bench-"))
    ns = Netns(f"tpdc{os.getpid()}")
    run(["ip", "netns", "add", ns.name])
    srv = Servers(ns, work)
    figures = {"rounds": a.rounds, "seconds": a.seconds, "cached": {}, "forward": {}}
    try:
        ns.ip("link set lo up")
        srv.start("resolver", LOADGEN, "dns-serve", "--addr", RESOLVER, port=15300)
        hot = names_file(work / "hot.txt", 1000, "hot")
        order = ["tproxyd", "dnsdist", "dnsmasq"]
        for r in range(a.rounds):
            for which in order[r % 3:] + order[:r % 3]:
                getattr(srv, which)()
                sat = cached_round(srv, which, hot, a.seconds)
                figures["cached"].setdefault(which, []).append(sat)
                log(f"round {r + 1} {which}: {sat['qps']:.0f} q/s")
                srv.stop(which)
        half = statistics.median(x["qps"] for x in figures["cached"]["dnsdist"]) / 2
        figures["half_rate"] = half
        for which in order:
            getattr(srv, which)()
            if which == "tproxyd":
                figures["rss_start_kib"] = proc_status(srv.procs["tproxyd"].pid, "VmRSS")
            dnsperf(srv.ns, PORTS[which], hot, 2)
            lat = dnsperf(srv.ns, PORTS[which], hot, a.seconds, qps=int(half), verbose=True)
            figures["cached"][which + "_half"] = lat
            log(f"{which} at {half:.0f} q/s: p50 {lat.get('p50_us', 0):.0f} us, p99 {lat.get('p99_us', 0):.0f} us")
            if which == "tproxyd":
                # The RSS the load itself leaves (buffers, the allocator's
                # per-thread arenas) before the names, to tell it apart
                # from what the names cost.
                figures["rss_loaded_kib"] = proc_status(srv.procs["tproxyd"].pid, "VmRSS")
                log(f"tproxyd RSS after start {figures['rss_start_kib']} KiB, "
                    f"after the latency run {figures['rss_loaded_kib']} KiB")
                many = names_file(work / "many.txt", 100_000 if not a.smoke else 10_000, "n")
                dnsperf(srv.ns, PORTS["tproxyd"], many, 60 if not a.smoke else 5, qps=20_000)
                # `ip netns exec` execs tproxyd in place: the pid is its own.
                figures["rss_100k_kib"] = proc_status(srv.procs["tproxyd"].pid, "VmRSS")
                log(f"tproxyd RSS with the names cached: {figures['rss_100k_kib']} KiB")
            srv.stop(which)
        forward(srv, figures, hot, a)
    finally:
        srv.stop_all()
        run(["ip", "netns", "del", ns.name], check=False)
    print(json.dumps(figures, indent=1))
    if a.out:
        a.out.write_text(json.dumps(figures, indent=1))


def dante_config(log_file):
    """dante on loopback with CONNECT and UDP ASSOCIATE."""
    return (
        f"logoutput: {log_file}\ninternal: 127.0.0.1 port = {SOCKS_PORT}\nexternal: 127.0.0.1\n"
        "clientmethod: none\nsocksmethod: none\nuser.privileged: root\n"
        "user.unprivileged: nobody\nclient pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
        "socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate udpreply }\n"
    )


def forward(srv, figures, names, a):
    """Uncached: every query goes to the resolver, straight from dnsperf
    (the floor), and through tproxyd with the cache off via direct, dante
    and ss-server."""
    rate = 2000 if a.smoke else 5000
    base = dnsperf(srv.ns, 15300, names, a.seconds, qps=rate, verbose=True)
    figures["forward"]["resolver"] = base
    log(f"resolver alone at {rate} q/s: p99 {base.get('p99_us', 0):.0f} us")
    conf = srv.work / "danted.conf"
    conf.write_text(dante_config(srv.work / "danted.log"))
    srv.start("dante", "danted", "-f", conf, proto="tcp", port=SOCKS_PORT)
    srv.start("ss-server", "ss-server", "-s", "127.0.0.1", "-p", SS_PORT, "-k", SS_KEY,
              "-m", "aes-128-gcm", "-u", port=SS_PORT)
    for outbound in ("direct", "socks5", "shadowsocks"):
        srv.tproxyd(outbound, cache=False)
        sat = dnsperf(srv.ns, PORTS["tproxyd"], names, a.seconds)
        lat = dnsperf(srv.ns, PORTS["tproxyd"], names, a.seconds, qps=rate, verbose=True)
        figures["forward"][outbound] = {"saturation": sat, "at_rate": lat, "rate": rate}
        log(f"uncached via {outbound}: {sat['qps']:.0f} q/s, p99 {lat.get('p99_us', 0):.0f} us at {rate} q/s")
        srv.stop("tproxyd")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
