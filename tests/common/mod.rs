//! The end-to-end test bed: three network namespaces joined by veth pairs,
//! built by `tproxyd::testbed` (shared with the demo and the benchmark),
//! with the tests' servers, dante and tproxyd on top.
//!
//! ```text
//!  lan                router (tproxyd + rules)           wan
//!  l0 192.0.2.2  ──  rlan 192.0.2.1    rwan 203.0.113.1 ── w0 203.0.113.2 (dante :1080)
//!     2001:db8:1::2     2001:db8:1::1      2001:db8:2::1      2001:db8:2::2
//!                                                           lo 198.51.100.10/.11
//!                                                              2001:db8:100::10/::11
//! ```
//!
//! The "internet" servers live on the WAN namespace's loopback, on
//! documentation addresses, so every packet stays inside namespaces this
//! test made. Each test builds its own bed under unique names and removes
//! it when dropped, also when the test fails.
//!
//! The servers run as threads of the test process: a thread that enters a
//! namespace with `setns` creates sockets there, and those sockets stay in
//! that namespace whichever thread later uses them.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tproxyd::testbed;
pub use tproxyd::testbed::shadowsocks::{SsImpl, SsServer};

pub mod dns_server;

pub const LAN_V4: &str = testbed::LAN_V4;
pub const LAN_V6: &str = testbed::LAN_V6;
pub const ROUTER_WAN_V4: &str = testbed::ROUTER_WAN_V4;
pub const ROUTER_WAN_V6: &str = testbed::ROUTER_WAN_V6;
pub const SOCKS_V4: &str = testbed::SOCKS_V4;
pub const SOCKS_V6: &str = testbed::SOCKS_V6;
/// Remote A: the servers every check talks to.
pub const REMOTE_A_V4: &str = testbed::REMOTE_A_V4;
pub const REMOTE_A_V6: &str = testbed::REMOTE_A_V6;
/// Remote B: the second host of the full-cone check.
pub const REMOTE_B_V4: &str = testbed::REMOTE_B_V4;
pub const REMOTE_B_V6: &str = testbed::REMOTE_B_V6;

/// TCP: sends "peer=ADDR\n", then echoes until EOF.
pub const ECHO_PORT: u16 = 7;
/// TCP: reads to EOF, waits, then answers "peer=ADDR bytes=N\n".
pub const SINK_PORT: u16 = 9;
/// UDP: answers "peer=ADDR\n" + payload from the address it was sent to;
/// a payload starting with "CONE" is answered from remote B instead.
pub const UDP_ECHO_PORT: u16 = 7;
/// Largest payload the UDP echo returns whole; larger ones are answered
/// with "len=N fnv=HASH" (the "peer=" prefix leaves room for this much).
pub const UDP_ECHO_MAX: usize = 65_400;
/// The largest UDP payload over IPv4.
pub const UDP_MAX: usize = 65_507;
/// UDP: the same echo on port 53 of remote A, for DNS-only capture.
pub const DNS_PORT: u16 = 53;
pub const PROXY_PORT: u16 = 1090;
pub const SOCKS_PORT: u16 = testbed::SOCKS_PORT;
/// Nothing listens here: an upstream that is down.
pub const DEAD_PORT: u16 = 1081;

pub const AUTH_USER: &str = "tproxyd-e2e";
pub const AUTH_PASSWORD: &str = "e2e-secret-pw";

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn remote_a(self, port: u16) -> SocketAddr {
        match self {
            Family::V4 => addr(REMOTE_A_V4, port),
            Family::V6 => addr(REMOTE_A_V6, port),
        }
    }
    pub fn remote_b(self, port: u16) -> SocketAddr {
        match self {
            Family::V4 => addr(REMOTE_B_V4, port),
            Family::V6 => addr(REMOTE_B_V6, port),
        }
    }
    pub fn lan_any(self) -> SocketAddr {
        match self {
            Family::V4 => addr(LAN_V4, 0),
            Family::V6 => addr(LAN_V6, 0),
        }
    }
    /// The address the servers must see a flow come from.
    pub fn hop(self, upstream: Upstream) -> IpAddr {
        let ip = match (upstream, self) {
            (Upstream::Direct, Family::V4) => ROUTER_WAN_V4,
            (Upstream::Direct, Family::V6) => ROUTER_WAN_V6,
            (_, Family::V4) => SOCKS_V4,
            (_, Family::V6) => SOCKS_V6,
        };
        ip.parse().unwrap()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tproxy,
    Redirect,
}

/// Which outbound tproxyd uses, and what the SOCKS5 server expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Direct,
    Socks,
    /// dante requires username/password; tproxyd is given the right ones.
    SocksAuth,
    /// dante requires username/password; tproxyd is given a wrong password.
    SocksWrongPassword,
    /// tproxyd points at a port where no SOCKS server listens.
    SocksDown,
}

/// Fails (never skips) under CI; elsewhere a non-root run skips with a note.
pub fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let ip = Command::new("ip").arg("-V").output().is_ok();
    let nft = Command::new("nft").arg("--version").output().is_ok();
    let dante = Path::new("/usr/sbin/danted").exists();
    if root && ip && nft && dante {
        return true;
    }
    let why = format!(
        "end-to-end tests need root, iproute2, nftables and dante-server \
         (root={root} ip={ip} nft={nft} danted={dante}); install them with ci/setup.sh"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    eprintln!("skipping: {why}");
    false
}

/// One network namespace, with helpers that panic on failure (the
/// library's `tproxyd::testbed::Netns` returns errors instead).
pub struct Netns {
    pub name: String,
    inner: testbed::Netns,
}

impl Netns {
    /// Creates a namespace that is deleted (after killing what runs in
    /// it) when this value is dropped.
    pub fn create(name: String) -> Netns {
        let inner = testbed::Netns::create(&name).unwrap_or_else(|e| panic!("{e:#}"));
        Netns { name, inner }
    }

    /// A handle to a namespace of a `testbed::Bed`, which deletes it.
    fn of(ns: &testbed::Netns) -> Netns {
        Netns {
            name: ns.name().to_string(),
            inner: testbed::Netns::named(ns.name()),
        }
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &str) {
        self.inner.ip(args).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) {
        self.inner.exec(args).unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub fn exec_output(&self, args: &[&str]) -> String {
        let out = self
            .inner
            .command(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn nft(&self, ruleset: &str) {
        self.inner.nft(ruleset).unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub fn sysctl(&self, setting: &str) {
        self.inner
            .sysctl(setting)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.inner.enter(f).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<String> {
        self.inner.pids().iter().map(u32::to_string).collect()
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A whole test bed: namespaces, servers, dante and (once started) tproxyd.
pub struct Testbed {
    /// Handles to the namespaces of `bed`.
    pub lan: Netns,
    pub router: Netns,
    pub wan: Netns,
    pub dir: PathBuf,
    stop: Arc<AtomicBool>,
    tproxyd: Option<Child>,
    dante: Option<Child>,
    /// The router's firewall and routing state before tproxyd first ran.
    pub baseline: String,
    tproxyd_cmd: Vec<String>,
    tproxyd_env: Vec<(String, String)>,
    /// A command tproxyd runs under (e.g. `setpriv ...`); empty: none.
    tproxyd_prefix: Vec<String>,
    starts: usize,
    /// Dropped last: kills what is left inside and deletes the namespaces.
    bed: testbed::Bed,
}

pub struct Options {
    pub mode: Mode,
    pub upstream: Upstream,
    pub extra_args: Vec<String>,
    /// None: the test writes the capture rules by hand and tproxyd runs
    /// with `--firewall none`. Some: tproxyd installs its own rules, run
    /// from a generated config file with these sections.
    pub own_rules: Option<OwnRules>,
}

/// Settings for a tproxyd that installs its own rules.
pub struct OwnRules {
    /// Top-level keys (tcp, udp, ...).
    pub top: String,
    /// The body of the [firewall] section.
    pub firewall: String,
}

/// A foreign table the tests create before tproxyd starts; it must come
/// through every start and stop untouched.
pub const FOREIGN_TABLE: &str = "table inet foreign_app {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 9999 counter accept
    }
}";

impl Testbed {
    /// Builds the topology, the servers and dante, starts tproxyd with the
    /// given options, and installs hand-written rules for `mode`.
    pub fn start(opts: Options) -> Testbed {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("tpd{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("tproxyd-e2e-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let bed =
            testbed::Bed::up(&id, &testbed::Options::default()).unwrap_or_else(|e| panic!("{e:#}"));
        let mut tb = Testbed {
            lan: Netns::of(&bed.lan),
            router: Netns::of(&bed.router),
            wan: Netns::of(&bed.wan),
            dir,
            stop: Arc::new(AtomicBool::new(false)),
            tproxyd: None,
            dante: None,
            baseline: String::new(),
            tproxyd_cmd: Vec::new(),
            tproxyd_env: Vec::new(),
            tproxyd_prefix: Vec::new(),
            starts: 0,
            bed,
        };
        tb.start_servers();
        let auth = matches!(
            opts.upstream,
            Upstream::SocksAuth | Upstream::SocksWrongPassword
        );
        tb.start_dante(auth);
        if let Some(own) = &opts.own_rules {
            tb.router.nft(FOREIGN_TABLE);
            // Always: tproxyd also clears its leftovers from the backend
            // it is not using, which may instantiate iptables' tables.
            let _ = own;
            tb.prime_iptables();
        } else {
            tb.install_rules(opts.mode);
        }
        tb.baseline = tb.snapshot();
        tb.prepare_tproxyd(&opts);
        tb.spawn_tproxyd();
        tb
    }

    /// iptables-nft creates a table's built-in chains the first time a rule
    /// goes into them and leaves them (empty, policy ACCEPT) afterwards.
    /// tproxyd never deletes built-in tables or chains, which may be
    /// anyone's, so the bed starts as a system where iptables' mangle and
    /// nat tables are already in use, as they are wherever the iptables
    /// backend is the one chosen.
    fn prime_iptables(&self) {
        for tool in ["iptables", "ip6tables"] {
            for table in ["mangle", "nat"] {
                for chain in ["PREROUTING", "OUTPUT"] {
                    self.router
                        .exec(&[tool, "-t", table, "-A", chain, "-j", "RETURN"]);
                    self.router
                        .exec(&[tool, "-t", table, "-D", chain, "-j", "RETURN"]);
                }
            }
        }
    }

    /// The router's whole firewall and policy-routing state, as text.
    pub fn snapshot(&self) -> String {
        let mut out = String::new();
        for cmd in [
            &["nft", "list", "ruleset"][..],
            &["iptables-save"],
            &["ip6tables-save"],
            &["ip", "rule"],
            &["ip", "-6", "rule"],
            &["ip", "route", "show", "table", "all"],
            &["ip", "-6", "route", "show", "table", "all"],
        ] {
            out.push_str(&format!("## {}\n", cmd.join(" ")));
            let text = self.router.exec_output(cmd);
            // iptables-save stamps the time in comments. The kernel adds
            // IPv6 link-local and multicast routes for each interface some
            // moments after it comes up, in its own time; tproxyd never
            // makes such routes, so they are left out of the comparison.
            let kernel_per_link = |l: &str| {
                l.contains("proto kernel") && (l.contains("fe80:") || l.contains("ff00::/8"))
            };
            for line in text
                .lines()
                .filter(|l| !l.starts_with('#') && !kernel_per_link(l))
            {
                // Packet counters (which iptables-nft adds to every rule)
                // count traffic, not configuration.
                let line = strip_counters(line);
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }

    fn install_rules(&self, mode: Mode) {
        let r = &self.router;
        match mode {
            Mode::Tproxy => {
                // UDP is left out of the socket match on purpose: a reply
                // socket bound to the remote would match it and swallow the
                // client's next datagrams.
                r.nft(&format!(
                    "table inet tpdtest {{
                       chain pre {{
                         type filter hook prerouting priority mangle; policy accept;
                         iifname \"rlan\" meta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 meta mark set 1 accept
                         iifname \"rlan\" ip daddr 198.51.100.0/24 meta l4proto {{ tcp, udp }} tproxy ip to :{PROXY_PORT} meta mark set 1 accept
                         iifname \"rlan\" ip6 daddr 2001:db8:100::/64 meta l4proto {{ tcp, udp }} tproxy ip6 to :{PROXY_PORT} meta mark set 1 accept
                       }}
                     }}"
                ));
                r.ip("rule add fwmark 1 lookup 100");
                r.ip("route add local default dev lo table 100");
                r.ip("-6 rule add fwmark 1 lookup 100");
                r.ip("-6 route add local default dev lo table 100");
            }
            Mode::Redirect => {
                r.nft(&format!(
                    "table inet tpdtest {{
                       chain pre {{
                         type nat hook prerouting priority dstnat; policy accept;
                         iifname \"rlan\" ip daddr 198.51.100.0/24 meta l4proto tcp redirect to :{PROXY_PORT}
                         iifname \"rlan\" ip6 daddr 2001:db8:100::/64 meta l4proto tcp redirect to :{PROXY_PORT}
                       }}
                     }}"
                ));
            }
        }
    }

    fn start_dante(&mut self, auth: bool) {
        self.start_dante_with(auth, true);
    }

    fn start_dante_with(&mut self, auth: bool, udp: bool) {
        let child = testbed::spawn_dante_with(&self.bed.wan, &self.dir, auth, udp)
            .unwrap_or_else(|e| panic!("{e:#}"));
        self.dante = Some(child);
        let socks = addr(SOCKS_V4, SOCKS_PORT);
        let up = self.wan.enter(|| {
            wait_until(Duration::from_secs(10), || {
                TcpStream::connect(socks).is_ok()
            })
        });
        assert!(
            up,
            "dante did not start listening on {socks}: {}",
            self.dante_log()
        );
    }

    fn prepare_tproxyd(&mut self, opts: &Options) {
        let mode = match opts.mode {
            Mode::Tproxy => "tproxy",
            Mode::Redirect => "redirect",
        };
        let socks = format!("{SOCKS_V4}:{SOCKS_PORT}");
        let (user, password) = match opts.upstream {
            Upstream::SocksAuth => (Some(AUTH_USER), Some(AUTH_PASSWORD)),
            Upstream::SocksWrongPassword => (Some(AUTH_USER), Some("not-the-password")),
            _ => (None, None),
        };
        if let Some(pw) = password {
            self.tproxyd_env
                .push(("TPROXYD_PASSWORD".into(), pw.into()));
        }
        let server = match opts.upstream {
            Upstream::Direct => None,
            Upstream::SocksDown => Some(format!("{SOCKS_V4}:{DEAD_PORT}")),
            _ => Some(socks),
        };
        let mut args: Vec<String> = vec!["run".into(), "--verbose".into()];
        match &opts.own_rules {
            None => {
                args.extend([
                    "--listen".into(),
                    format!("[::]:{PROXY_PORT}"),
                    "--mode".into(),
                    mode.into(),
                ]);
                args.extend(["--firewall".into(), "none".into()]);
                match &server {
                    None => args.push("--direct".into()),
                    Some(s) => args.extend(["--socks5".into(), s.clone()]),
                }
                if let Some(u) = user {
                    args.extend(["--username".into(), u.into()]);
                }
            }
            Some(own) => {
                let outbound = match &server {
                    None => "type = \"direct\"\n".to_string(),
                    Some(s) => {
                        let mut o = format!("type = \"socks5\"\nserver = \"{s}\"\n");
                        if let Some(u) = user {
                            o.push_str(&format!(
                                "username = \"{u}\"\npassword_env = \"TPROXYD_PASSWORD\"\n"
                            ));
                        }
                        o
                    }
                };
                let file = self.config_path();
                std::fs::write(
                    &file,
                    format!(
                        "{}mode = \"{mode}\"\n{}\n[outbound]\n{outbound}\n[firewall]\n{}\n",
                        // A test may choose its own listen address.
                        if own.top.contains("listen =") {
                            String::new()
                        } else {
                            format!("listen = \"[::]:{PROXY_PORT}\"\n")
                        },
                        own.top,
                        own.firewall
                    ),
                )
                .unwrap();
                args.extend(["-c".into(), file.display().to_string()]);
            }
        }
        args.extend(opts.extra_args.iter().cloned());
        self.tproxyd_cmd = args;
    }

    /// The generated config file (own-rules beds only).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("tproxyd.toml")
    }

    /// Runs `tproxyd ARGS` in the router namespace to completion.
    pub fn tproxyd_cli(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router.name,
                env!("CARGO_BIN_EXE_tproxyd"),
            ])
            .args(args)
            .envs(
                self.tproxyd_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdin(Stdio::null())
            .output()
            .expect("run tproxyd")
    }

    /// Starts tproxyd (again) and waits until it listens.
    pub fn spawn_tproxyd(&mut self) {
        assert!(self.tproxyd.is_none(), "tproxyd already running");
        self.starts += 1;
        let log = self.dir.join("tproxyd.log");
        let mut log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writeln!(log_file, "==== start {} ====", self.starts).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.router.name])
            .args(&self.tproxyd_prefix)
            .arg(env!("CARGO_BIN_EXE_tproxyd"))
            .args(&self.tproxyd_cmd)
            .envs(
                self.tproxyd_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start tproxyd");
        self.tproxyd = Some(child);
        let marker = format!("==== start {} ====", self.starts);
        let started = || {
            let log = self.tproxyd_log();
            let this_run = log.rsplit(&marker).next().unwrap_or("").to_string();
            let ready = this_run.contains("tproxyd listening")
                && (!self.tproxyd_cmd.iter().any(|a| a == "-c")
                    || this_run.contains("firewall rules and policy routes installed")
                    || this_run.contains("no firewall rules installed"));
            ready || self.tproxyd_exited()
        };
        let ready = wait_until(Duration::from_secs(10), started);
        assert!(
            ready && !self.tproxyd_exited(),
            "tproxyd did not start:\n{}",
            self.tproxyd_log()
        );
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop_tproxyd(&mut self) {
        let mut child = self.tproxyd.take().expect("tproxyd not running");
        // `ip netns exec` execs tproxyd in place: the child's pid is tproxyd's.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "tproxyd exited with {status} on SIGTERM:\n{}",
                    self.tproxyd_log()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tproxyd did not stop on SIGTERM:\n{}", self.tproxyd_log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn tproxyd_exited(&self) -> bool {
        // Only checks; the child is reaped in Drop.
        self.tproxyd
            .as_ref()
            .map(|c| Path::new(&format!("/proc/{}", c.id())).exists())
            .map(|alive| !alive || proc_is_zombie(self.tproxyd.as_ref().unwrap().id()))
            .unwrap_or(true)
    }

    pub fn tproxyd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tproxyd.log")).unwrap_or_default()
    }

    pub fn dante_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("danted.log")).unwrap_or_default()
    }

    /// Waits up to `within` for the tproxyd log to contain `needle`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        wait_until(within, || self.tproxyd_log().contains(needle))
    }

    fn start_servers(&self) {
        let stop = &self.stop;
        let sockets = self.wan.enter(|| {
            let mut tcp = Vec::new();
            let mut udp = Vec::new();
            let mut dns = Vec::new();
            for ip in [REMOTE_A_V4, REMOTE_A_V6] {
                tcp.push((TcpListener::bind(addr(ip, ECHO_PORT)).unwrap(), ECHO_PORT));
                tcp.push((TcpListener::bind(addr(ip, SINK_PORT)).unwrap(), SINK_PORT));
            }
            for (a, b) in [(REMOTE_A_V4, REMOTE_B_V4), (REMOTE_A_V6, REMOTE_B_V6)] {
                let sa = UdpSocket::bind(addr(a, UDP_ECHO_PORT)).unwrap();
                let sb = UdpSocket::bind(addr(b, UDP_ECHO_PORT)).unwrap();
                udp.push((sa, sb));
                dns.push(UdpSocket::bind(addr(a, DNS_PORT)).unwrap());
            }
            (tcp, udp, dns)
        });
        let (tcp, udp, dns) = sockets;
        for s in dns {
            let stop = Arc::clone(stop);
            thread::spawn(move || udp_server(s, None, stop));
        }
        for (listener, port) in tcp {
            let stop = Arc::clone(stop);
            listener.set_nonblocking(true).unwrap();
            thread::spawn(move || tcp_server(listener, port, stop));
        }
        for (a, b) in udp {
            let b2 = b.try_clone().unwrap();
            let stop2 = Arc::clone(stop);
            // B answers its own datagrams too, like any echo server.
            thread::spawn(move || udp_server(b2, None, stop2));
            let stop = Arc::clone(stop);
            thread::spawn(move || udp_server(a, Some(b), stop));
        }
    }

    /// Stops tproxyd (SIGKILL) to simulate a crash or an outage.
    pub fn kill_tproxyd(&mut self) {
        if let Some(mut c) = self.tproxyd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops dante, as an upstream outage.
    pub fn stop_dante(&mut self) {
        // dante forks helpers. `ip netns exec` changes only the network
        // namespace, so `pidof` would see (and kill) every test's dante:
        // ask for the processes of this bed's WAN namespace instead.
        for pid in self.wan.pids() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "danted" {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
        }
        if let Some(mut c) = self.dante.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// "counter packets 4 bytes 216" -> "counter"; "[4:216]" -> "[0:0]".
fn strip_counters(line: &str) -> String {
    let words: Vec<&str> = line.split(' ').collect();
    let mut out = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if words[i].ends_with("counter")
            && words.get(i + 1) == Some(&"packets")
            && words.get(i + 3) == Some(&"bytes")
        {
            out.push(words[i]);
            i += 5;
            continue;
        }
        out.push(words[i]);
        i += 1;
    }
    let joined = out.join(" ");
    match (joined.rfind(" ["), joined.ends_with(']')) {
        (Some(at), true) if joined.starts_with(':') => format!("{} [0:0]", &joined[..at]),
        _ => joined,
    }
}

fn proc_is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if thread::panicking() {
            eprintln!("---- tproxyd log ----\n{}", self.tproxyd_log());
            eprintln!(
                "---- dante log (tail) ----\n{}",
                tail(&self.dante_log(), 40)
            );
        }
        if let Some(mut c) = self.tproxyd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut c) = self.dante.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The bed is dropped next: it kills what is left inside and
        // deletes the namespaces.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn tcp_server(listener: TcpListener, port: u16, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                thread::spawn(move || {
                    let _ = serve_tcp(stream, peer, port);
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve_tcp(mut stream: TcpStream, peer: SocketAddr, port: u16) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    if port == ECHO_PORT {
        stream.write_all(format!("peer={peer}\n").as_bytes())?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n])?;
        }
        stream.shutdown(Shutdown::Write)?;
    } else {
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n;
        }
        // Answer well after the client's FIN: a proxy that closes the flow
        // when the client half-closes loses this answer.
        thread::sleep(Duration::from_millis(300));
        stream.write_all(format!("peer={peer} bytes={total}\n").as_bytes())?;
        stream.shutdown(Shutdown::Write)?;
    }
    Ok(())
}

fn udp_server(socket: UdpSocket, cone_peer: Option<UdpSocket>, stop: Arc<AtomicBool>) {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let mut reply = format!("peer={peer}\n").into_bytes();
        if n > UDP_ECHO_MAX {
            // The prefix would push an echo past the largest datagram:
            // answer with what arrived instead.
            reply.extend_from_slice(format!("len={n} fnv={:016x}", checksum(&buf[..n])).as_bytes());
        } else {
            reply.extend_from_slice(&buf[..n]);
        }
        let from = match &cone_peer {
            Some(b) if buf[..n].starts_with(b"CONE") => b,
            _ => &socket,
        };
        let _ = from.send_to(&reply, peer);
    }
}

/// Reads the "peer=ADDR" line a server prefixes its answer with.
pub fn peer_line(text: &[u8]) -> (SocketAddr, usize) {
    let end = text.iter().position(|&b| b == b'\n').unwrap_or_else(|| {
        panic!(
            "no peer line in {:?}",
            String::from_utf8_lossy(&text[..text.len().min(80)])
        )
    });
    let line = std::str::from_utf8(&text[..end]).unwrap();
    let first = line.split_whitespace().next().unwrap();
    let peer = first
        .strip_prefix("peer=")
        .unwrap_or_else(|| panic!("unexpected answer {line:?}"))
        .parse()
        .unwrap();
    (peer, end + 1)
}

/// Deterministic pseudo-random bytes (xorshift), so no RNG crate is needed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, 64 bit: a checksum for comparing transfers.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// One TCP echo exchange from inside `ns`; returns the peer address the
/// server saw. Panics with the cause if the exchange fails.
pub fn tcp_echo(ns: &Netns, dst: SocketAddr) -> SocketAddr {
    let got = ns.enter(|| {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {dst} from {}: {e}", ns.name));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"echo me").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("read from {dst}: {e}"));
        got
    });
    let (peer, off) = peer_line(&got);
    assert_eq!(&got[off..], b"echo me", "echo from {dst}");
    peer
}

/// One UDP exchange from inside `ns`, from a socket bound to `bind`;
/// returns (reply source, peer the server saw), or None on no answer
/// within `wait`.
pub fn udp_echo(
    ns: &Netns,
    bind: SocketAddr,
    dst: SocketAddr,
    wait: Duration,
) -> Option<(SocketAddr, SocketAddr)> {
    ns.enter(|| {
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        s.send_to(b"udp echo me", dst).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf).ok()?;
        let (peer, off) = peer_line(&buf[..n]);
        assert_eq!(&buf[off..n], b"udp echo me");
        Some((from, peer))
    })
}

impl Testbed {
    /// tproxyd's pid while it runs (`ip netns exec`, and a prefix such as
    /// setpriv, exec it in place: the child's pid is tproxyd's).
    pub fn tproxyd_pid(&self) -> Option<u32> {
        self.tproxyd.as_ref().map(|c| c.id())
    }

    /// Whether the tproxyd this bed started is still running.
    pub fn tproxyd_running(&self) -> bool {
        !self.tproxyd_exited()
    }

    /// Sends `signal` (as `kill` names it: HUP, TERM, ...) to tproxyd.
    pub fn signal_tproxyd(&self, signal: &str) {
        let pid = self.tproxyd_pid().expect("tproxyd not running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Runs tproxyd under `prefix` (a command that execs the rest, such as
    /// `setpriv ...`) from its next start on.
    pub fn run_tproxyd_under(&mut self, prefix: &[&str]) {
        self.tproxyd_prefix = prefix.iter().map(|s| s.to_string()).collect();
    }

    /// The arguments tproxyd is started with (after the binary).
    pub fn tproxyd_args(&self) -> Vec<String> {
        self.tproxyd_cmd.clone()
    }

    /// Starts dante again after [`stop_dante`](Self::stop_dante), without
    /// authentication, and waits until it listens.
    pub fn restart_dante(&mut self) {
        assert!(self.dante.is_none(), "dante already running");
        self.start_dante(false);
    }

    /// Replaces dante with one that refuses UDP ASSOCIATE (CONNECT only,
    /// no authentication), as many SOCKS5 servers do.
    pub fn restart_dante_without_udp(&mut self) {
        self.stop_dante();
        self.start_dante_with(false, false);
    }
}

impl Testbed {
    /// Starts a reference shadowsocks server (`ss-server` or `ssserver`)
    /// in the WAN namespace on a free port, TCP and UDP on both WAN host
    /// addresses; it stops when dropped and prints its log if the test
    /// fails (see `tproxyd::testbed::shadowsocks`).
    pub fn start_ss(&self, kind: SsImpl, method: &str, password: &str) -> SsServer {
        SsServer::start(&self.bed.wan, &self.dir, kind, method, password)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Restarts tproxyd with `run ARGS` (after `run --verbose`): for the
    /// command-line forms, such as `--upstream URL`. Ready once it listens.
    pub fn restart_tproxyd_with_args(&mut self, args: &[&str]) {
        if self.tproxyd.is_some() {
            self.stop_tproxyd();
        }
        self.tproxyd_cmd = ["run", "--verbose"]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        self.spawn_tproxyd();
    }

    /// Sets `key=value` in the environment of the tproxyd processes started
    /// from now on (`SSL_CERT_FILE` for a test CA).
    pub fn set_tproxyd_env(&mut self, key: &str, value: &str) {
        self.tproxyd_env.retain(|(k, _)| k != key);
        self.tproxyd_env.push((key.into(), value.into()));
    }

    /// Restarts tproxyd from `config`, a whole TOML file written as given:
    /// for tests that need sections the generated config lacks
    /// (`[[outbounds]]`, `[route]`). With `backend = "none"` the bed's
    /// hand-written rules capture; tproxyd is then ready once it listens
    /// (`--config` rather than `-c`, so the start-up wait does not look
    /// for the rules-installed line that backend never logs).
    pub fn restart_tproxyd_with_config(&mut self, config: &str) {
        if self.tproxyd.is_some() {
            self.stop_tproxyd();
        }
        let file = self.config_path();
        std::fs::write(&file, config).unwrap();
        let flag = if config.contains("backend = \"none\"") {
            "--config"
        } else {
            "-c"
        };
        self.tproxyd_cmd = vec![
            "run".into(),
            "--verbose".into(),
            flag.into(),
            file.display().to_string(),
        ];
        self.spawn_tproxyd();
    }
}

/// The firewall backend of a tproxyd that installs its own rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Iptables,
}

impl Backend {
    /// The name as `[firewall] backend` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::Iptables => "iptables",
        }
    }
}

/// A bed whose tproxyd (dante upstream) installs its own rules with
/// `backend`, from `top` keys and the `[firewall]` body; None when the
/// bed cannot run here (and CI is not set).
pub fn own_bed(backend: Backend, mode: Mode, top: &str, firewall: &str) -> Option<Testbed> {
    let firewall = format!("backend = \"{}\"\n{firewall}", backend.name());
    can_run().then(|| {
        Testbed::start(Options {
            mode,
            upstream: Upstream::Socks,
            extra_args: vec![],
            own_rules: Some(OwnRules {
                top: top.into(),
                firewall,
            }),
        })
    })
}

impl Testbed {
    /// Runs tproxyd with `args` in the router namespace under `prefix` (a
    /// command that execs the rest, such as setpriv; may be empty) to its
    /// exit, and returns whether it succeeded and its stderr. A tproxyd
    /// still running after 10 s fails the test: it was meant to refuse.
    pub fn run_to_exit(&self, prefix: &[&str], args: &[String]) -> (bool, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.router.name])
            .args(prefix)
            .arg(env!("CARGO_BIN_EXE_tproxyd"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    pipe.read_to_string(&mut err).unwrap();
                }
                return (status.success(), err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tproxyd {args:?} under {prefix:?} did not exit within 10 s");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Testbed {
    /// Established TCP connections from the router to dante's port: the
    /// control connections of UDP associations (when no TCP flow runs).
    pub fn socks_control_connections(&self) -> usize {
        self.router
            .exec_output(&[
                "ss",
                "-Htn",
                "state",
                "established",
                &format!("( dport = :{SOCKS_PORT} )"),
            ])
            .lines()
            .count()
    }
}
