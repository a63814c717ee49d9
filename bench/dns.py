#!/usr/bin/env python3
"""DNS over TCP through a SOCKS5 server without UDP, under load (issue 10).

In the tests' LAN/router/WAN bed (`tproxyd testbed up --bench`): a DNS
server (loadgen dns-serve, UDP and TCP) on remote A port 53, and dante with
CONNECT only (no UDP ASSOCIATE). The LAN client (loadgen dns-load) sends
RATE queries a second over UDP, open loop, from several ports:

  direct   no proxy: the router forwards the UDP queries (the baseline)
  tproxyd  tproxyd captures them (its own rules) and, finding that dante
           refuses UDP, carries them as DNS over TCP through CONNECT

Printed: queries sent, answered, lost; p50/p99 latency of each and what
tproxyd adds; the TCP connections dante opened to the resolver. Rounds
alternate the two. Numbers, never a pass/fail on time.

  sudo bench/run --dns [--rate 1000] [--seconds 10] [--rounds 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import LOADGEN, TPROXYD, Netns, max_nofile, run  # noqa: E402

DNS_PORT = 53


def dante_without_udp(log, socks, port):
    """dante as the tests run it (src/testbed.rs), CONNECT only."""
    rules = "".join(
        f"socks pass {{ from: {a} to: {b} command: connect }}\n"
        for a in ("0.0.0.0/0", "::/0")
        for b in ("0.0.0.0/0", "::/0")
    )
    return (
        f"logoutput: {log}\ninternal: {socks} port = {port}\nexternal: {socks}\n"
        "clientmethod: none\nsocksmethod: none\nuser.privileged: root\n"
        "user.unprivileged: nobody\nclient pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
        "client pass { from: ::/0 to: ::/0 }\n" + rules
    )


def load(lan, target, a):
    out = lan.sh(LOADGEN, "dns-load", "--target", target, "--rate", a.rate,
                 "--seconds", a.seconds, "--sockets", a.sockets, timeout=a.seconds + 30)
    return json.loads(out.stdout)


def tcp_connections_to(wan, port):
    """Connections accepted by the resolver's TCP side so far (from ss)."""
    out = wan.sh("ss", "-Htn", "state", "established", f"( sport = :{port} )", check=False)
    return len(out.stdout.splitlines())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--sockets", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="one short round")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    a = ap.parse_args()
    if a.smoke:
        a.rounds, a.seconds = 1, 1
    work = Path(tempfile.mkdtemp(prefix="tproxyd-dns-bench-"))
    prefix = f"tpd{__import__('os').getpid()}"
    up = run([TPROXYD, "testbed", "up", "--prefix", prefix, "--bench", "--json"])
    bed = json.loads(up.stdout)
    try:
        names, addrs = bed["namespaces"], bed["addresses"]
        lan, rtr, wan = Netns(names["lan"]), Netns(names["router"]), Netns(names["wan"])
        resolver = f"{addrs['remote_a_v4']}:{DNS_PORT}"
        socks = addrs["wan_v4"]
        port = bed["socks_port"]
        conf = work / "danted.conf"
        conf.write_text(dante_without_udp(work / "danted.log", socks, port))
        wan.spawn("danted", "-f", conf, "-p", work / "danted.pid", log_to=work / "danted.out")
        wan.wait_listening("tcp", port, "dante")
        wan.spawn(LOADGEN, "dns-serve", "--addr", resolver, log_to=work / "dns-serve.log")
        wan.wait_listening("udp", DNS_PORT, "dns-serve")
        samples = {"direct": [], "tproxyd": []}
        for r in range(a.rounds):
            samples["direct"].append(load(lan, resolver, a))
            proc = rtr.spawn(TPROXYD, "run", "--socks5", f"{socks}:{port}",
                             "--lan-interface", bed["interfaces"]["router_lan"],
                             log_to=work / f"tproxyd-{r}.log")
            try:
                rtr.wait_listening("udp", 1090, "tproxyd")
                deadline = time.time() + 10
                while "refuses UDP ASSOCIATE" not in (work / f"tproxyd-{r}.log").read_text():
                    if time.time() > deadline:
                        raise SystemExit("tproxyd never found that dante refuses UDP")
                    time.sleep(0.05)
                got = load(lan, resolver, a)
                got["connections"] = tcp_connections_to(wan, DNS_PORT)
                samples["tproxyd"].append(got)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
            print(f"round {r + 1}: direct {samples['direct'][-1]}\n         tproxyd {samples['tproxyd'][-1]}",
                  flush=True)
        med = {k: {f: statistics.median(s[f] for s in v) for f in ("sent", "answered", "lost", "rate",
                                                                    "p50_us", "p99_us", "max_us")}
               for k, v in samples.items()}
        d, t = med["direct"], med["tproxyd"]
        lost = sum(s["lost"] for s in samples["tproxyd"])
        sent = sum(s["sent"] for s in samples["tproxyd"])
        conns = max(s["connections"] for s in samples["tproxyd"])
        print()
        print(f"DNS over TCP through SOCKS5 without UDP: {a.rate} queries/s for {a.seconds} s, "
              f"{a.sockets} client ports, medians of {a.rounds} rounds")
        print(f"  lost through tproxyd: {lost} of {sent} (direct: "
              f"{sum(s['lost'] for s in samples['direct'])} of {sum(s['sent'] for s in samples['direct'])})")
        print(f"  latency p50: direct {d['p50_us']:.0f} µs, tproxyd {t['p50_us']:.0f} µs, "
              f"added {t['p50_us'] - d['p50_us']:.0f} µs ({t['p50_us'] / d['p50_us']:.2f}×)")
        print(f"  latency p99: direct {d['p99_us']:.0f} µs, tproxyd {t['p99_us']:.0f} µs, "
              f"added {t['p99_us'] - d['p99_us']:.0f} µs ({t['p99_us'] / d['p99_us']:.2f}×)")
        print(f"  resolver's TCP connections from dante: at most {conns} at once")
        if a.out:
            a.out.write_text(json.dumps({"samples": samples, "median": med}, indent=1) + "\n")
    finally:
        run([TPROXYD, "testbed", "down", "--prefix", prefix], check=False)


if __name__ == "__main__":
    main()
