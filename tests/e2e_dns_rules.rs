//! Named resolvers and DNS rules (issue 21), end to end in the
//! namespaces: two dnsmasq servers on the bed's "internet" side, one
//! playing the poisoning ISP resolver (it gives foreign names a wrong
//! address), one honest, reached through the SOCKS5 proxy (dante). A
//! LAN client (`dig`) asks captured UDP port 53 of an address where no
//! resolver listens; tproxyd answers it itself:
//!
//! - a `cn` name goes to the ISP, directly from the router;
//! - a foreign name goes to the honest server, through dante;
//! - a fallback rule asks both, keeps the ISP's answer when its address is
//!   in the `cn-ip` set and takes the honest one when it is not.
//!
//! tproxyd's own queries must carry its mark (the firewall skips marked
//! packets, so a query can never loop back into tproxyd): the router drops
//! every unmarked packet it sends to port 53, and the ISP still answers.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// Where the two resolvers listen (in the wan namespace, routed through
/// it like the remotes).
const ISP: &str = "198.51.100.53";
const HONEST: &str = "198.51.100.54";
/// Captured, but nothing listens there: only tproxyd can answer.
const ASKED: &str = "198.51.100.1";

/// The "domestic" prefix: what the ISP honestly answers for cn names.
const DOMESTIC: &str = "198.51.100.80";
const POISON: &str = "203.0.113.66";
const TRUE_FOREIGN: &str = "198.51.100.90";

/// dnsmasq processes, killed on drop (the bed kills what is left too).
struct Resolvers(Vec<Child>);

impl Drop for Resolvers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A dnsmasq in `ns` on `ip`:53 (UDP and TCP) answering `answers`
/// (name, address) and nothing else, logging queries to `log`.
fn dnsmasq(ns: &Netns, ip: &str, answers: &[(&str, &str)], log: &std::path::Path) -> Child {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.name,
        "dnsmasq",
        "-k",
        "-C",
        "/dev/null",
    ])
    .args([
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
    ])
    .arg("--pid-file=")
    .arg(format!("--listen-address={ip}"))
    .arg("--port=53")
    .arg("--log-queries")
    .arg(format!("--log-facility={}", log.display()));
    for (name, addr) in answers {
        cmd.arg(format!("--address=/{name}/{addr}"));
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq")
}

/// `dig` from the LAN to the captured address: (status line, answer
/// section), the whole output on failure.
fn dig(tb: &Testbed, name: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &tb.lan.name, "dig", "+time=5", "+tries=1"])
        .arg(format!("@{ASKED}"))
        .args([name, "A"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The A records of a dig answer section.
fn addresses(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[3] == "A").then(|| f[4].to_string())
        })
        .collect()
}

#[test]
fn split_dns_answers_by_rule_and_replaces_poisoned_answers() {
    if !can_run() {
        return;
    }
    for tool in ["dig", "dnsmasq"] {
        let found = Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            let why = format!("{tool} is missing (scripts/setup-test-deps installs it)");
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipping: {why}");
            return;
        }
    }
    let mut tb = Testbed::start(Options {
        mode: Mode::Tproxy,
        upstream: Upstream::Socks,
        extra_args: vec![],
        own_rules: None,
    });
    for ip in [ISP, HONEST] {
        tb.wan.ip(&format!("addr add {ip}/32 dev lo"));
    }
    let (isp_log, honest_log) = (tb.dir.join("isp.log"), tb.dir.join("honest.log"));
    let _resolvers = Resolvers(vec![
        dnsmasq(
            &tb.wan,
            ISP,
            &[
                ("www.example.cn", DOMESTIC),
                ("good.fallback.test", DOMESTIC),
                // The lies.
                ("foreign.example", POISON),
                ("poisoned.fallback.test", POISON),
            ],
            &isp_log,
        ),
        dnsmasq(
            &tb.wan,
            HONEST,
            &[
                ("www.example.cn", TRUE_FOREIGN),
                ("good.fallback.test", TRUE_FOREIGN),
                ("foreign.example", TRUE_FOREIGN),
                ("poisoned.fallback.test", TRUE_FOREIGN),
            ],
            &honest_log,
        ),
    ]);
    // The router drops every packet it sends to port 53 without
    // tproxyd's mark (255, the default): a query that answers left marked.
    tb.router.nft(
        "table inet e2e_mark_check {\n\
           chain out {\n\
             type filter hook output priority 0; policy accept;\n\
             meta l4proto { tcp, udp } th dport 53 meta mark != 255 counter drop\n\
           }\n\
         }\n",
    );

    let cn = tb.dir.join("cn.txt");
    std::fs::write(&cn, "cn\n").unwrap();
    let cn_ip = tb.dir.join("cn-ip.txt");
    std::fs::write(&cn_ip, format!("{DOMESTIC}/32\n")).unwrap();
    tb.restart_tproxyd_with_config(&format!(
        "listen = \"[::]:{PROXY_PORT}\"\nmode = \"tproxy\"\n\
         [[outbounds]]\nname = \"proxy\"\ntype = \"socks5\"\nserver = \"{SOCKS_V4}:{SOCKS_PORT}\"\n\
         [[outbounds]]\nname = \"direct\"\ntype = \"direct\"\n\
         [route]\nfinal = \"direct\"\n\
         [[route.rule_sets]]\nname = \"cn\"\nformat = \"domains\"\npath = \"{}\"\n\
         [[route.rule_sets]]\nname = \"cn-ip\"\nformat = \"cidr\"\npath = \"{}\"\n\
         [dns]\nfinal = \"foreign\"\n\
         [[dns.servers]]\nname = \"isp\"\naddress = \"udp://{ISP}\"\noutbound = \"direct\"\n\
         [[dns.servers]]\nname = \"foreign\"\naddress = \"udp://{HONEST}\"\noutbound = \"proxy\"\n\
         [[dns.rules]]\nrule_set = [\"cn\"]\nserver = \"isp\"\n\
         [[dns.rules]]\ndomain_suffix = [\"fallback.test\"]\nserver = \"isp\"\n\
         fallback = \"foreign\"\naccept_ip = [\"cn-ip\"]\n\
         [firewall]\nbackend = \"none\"\n",
        cn.display(),
        cn_ip.display()
    ));

    let ask = |name: &str| {
        let out = dig(&tb, name);
        assert!(
            out.contains("status: NOERROR") && out.contains(&format!("SERVER: {ASKED}#53")),
            "{name}: {out}\n{}",
            tb.tproxyd_log()
        );
        addresses(&out)
    };
    // The cn name from the ISP, the foreign one from the honest server.
    assert_eq!(ask("www.example.cn"), [DOMESTIC]);
    assert_eq!(ask("foreign.example"), [TRUE_FOREIGN]);
    // Fallback by answer: the ISP's answer kept when domestic, replaced
    // when poisoned.
    assert_eq!(ask("good.fallback.test"), [DOMESTIC]);
    assert_eq!(ask("poisoned.fallback.test"), [TRUE_FOREIGN]);
    // 0x20-style mixed case is answered, the question as asked.
    let out = dig(&tb, "WwW.Example.CN");
    assert!(out.contains("WwW.Example.CN."), "{out}");

    // Who asked whom: the ISP from the router (direct), the honest server
    // from dante (through the proxy); the foreign name never reached the
    // ISP, the cn name never the honest server.
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(3), || read(&isp_log)
            .contains("poisoned.fallback.test")
            && read(&honest_log).contains("poisoned.fallback.test")),
        "isp:\n{}\nhonest:\n{}",
        read(&isp_log),
        read(&honest_log)
    );
    let (isp, honest) = (read(&isp_log), read(&honest_log));
    let asked_by = |log: &str, name: &str| -> Vec<String> {
        log.lines()
            .filter(|l| {
                l.contains(&format!("]{name} from ")) || l.contains(&format!(" {name} from "))
            })
            .filter_map(|l| l.rsplit(" from ").next().map(str::to_string))
            .collect()
    };
    let isp_www = asked_by(&isp, "www.example.cn");
    assert!(
        !isp_www.is_empty() && isp_www.iter().all(|f| f == ROUTER_WAN_V4),
        "{isp}"
    );
    let honest_foreign = asked_by(&honest, "foreign.example");
    assert!(
        !honest_foreign.is_empty() && honest_foreign.iter().all(|f| f == SOCKS_V4),
        "{honest}"
    );
    assert!(asked_by(&isp, "foreign.example").is_empty(), "{isp}");
    assert!(asked_by(&honest, "www.example.cn").is_empty(), "{honest}");
    // Both servers were asked for the poisoned name (for the good one
    // the ISP's accepted answer may come before the proxy's connection).
    assert!(
        !asked_by(&isp, "poisoned.fallback.test").is_empty(),
        "{isp}"
    );
    assert!(
        !asked_by(&honest, "poisoned.fallback.test").is_empty(),
        "{honest}"
    );
}
