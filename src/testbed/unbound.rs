//! unbound serving DoT and DoH with a throwaway CA made by `openssl`,
//! for the DNS tests: on loopback (the upstreams' unit tests) or in a
//! namespace of the bed (tests/e2e_dns_servers.rs). unbound answers only
//! from `local-data` (every other name is NXDOMAIN: `local-zone: "."
//! static`) and never queries, so nothing leaves the test.
//!
//! A missing `unbound` or `openssl` skips (`None`), and panics under CI
//! (scripts/setup-test-deps installs both).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `program` runs; under CI its absence fails the test.
pub fn have(program: &str) -> bool {
    let found = Command::new(program)
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is not installed (scripts/setup-test-deps installs it)"
        );
        eprintln!("{program} is not installed: skipping");
    }
    found
}

/// A directory removed when the test ends.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tproxyd-dns-tls-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway CA and a server certificate it signed, for `dns.test`
/// and 127.0.0.1.
pub struct Pki {
    _dir: TempDir,
    /// The CA certificate, PEM.
    pub ca: Vec<u8>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn new() -> Option<Pki> {
        if !have("openssl") {
            return None;
        }
        let dir = TempDir::new("pki");
        let d = &dir.0;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            d,
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
                &["-subj", "/CN=tproxyd test CA"],
            ]
            .concat(),
        );
        openssl(
            d,
            &[
                &["req"][..],
                &ec,
                &["-keyout", "server.key", "-out", "server.csr"],
                &["-subj", "/CN=dns.test"],
            ]
            .concat(),
        );
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:dns.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        Some(Pki {
            ca: std::fs::read(d.join("ca.pem")).unwrap(),
            cert: d.join("server.pem"),
            key: d.join("server.key"),
            _dir: dir,
        })
    }
}

/// unbound: DoT on `dot`, DoH on `doh` (path `/dns-query`), killed on
/// drop.
pub struct Unbound {
    child: Child,
    pub dot: SocketAddr,
    pub doh: SocketAddr,
    pub pki: Pki,
    dir: TempDir,
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Unbound {
    /// Started on loopback (free ports) and answering; `idle_ms`: its
    /// tcp-idle-timeout (it closes a connection unused for that long).
    /// Answers `a.test` (192.0.2.1) and `n<i>.test` (198.51.100.<i>,
    /// i < 64), TTL 300.
    pub fn start(idle_ms: u32) -> Option<Unbound> {
        let ub = Unbound::spawn(None, Ipv4Addr::LOCALHOST, free_port(), free_port(), idle_ms)?;
        for _ in 0..100 {
            let up = |a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(100));
            if up(ub.dot).is_ok() && up(ub.doh).is_ok() {
                return Some(ub);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("unbound did not start: {}", ub.log());
    }

    /// Started inside network namespace `netns` on `ip` (an address it
    /// has), with the same zone as [`Unbound::start`]; ready once it says
    /// so in its log (the test process cannot connect into the namespace).
    pub fn start_in(netns: &str, ip: Ipv4Addr, dot: u16, doh: u16) -> Option<Unbound> {
        let ub = Unbound::spawn(Some(netns), ip, dot, doh, 30_000)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ub.log().contains("start of service") {
                return Some(ub);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("unbound did not start: {}", ub.log());
    }

    fn spawn(
        netns: Option<&str>,
        ip: Ipv4Addr,
        dot: u16,
        doh: u16,
        idle_ms: u32,
    ) -> Option<Unbound> {
        if !have("unbound") {
            return None;
        }
        let pki = Pki::new()?;
        let dir = TempDir::new("unbound");
        let mut data = String::from("  local-data: \"a.test. 300 IN A 192.0.2.1\"\n");
        for i in 0..64 {
            data.push_str(&format!(
                "  local-data: \"n{i}.test. 300 IN A 198.51.100.{i}\"\n"
            ));
        }
        let conf = format!(
            "server:\n  verbosity: 1\n  interface: {ip}@{dot}\n  interface: {ip}@{doh}\n  \
             tls-port: {dot}\n  https-port: {doh}\n  http-endpoint: \"/dns-query\"\n  \
             tls-service-key: \"{key}\"\n  tls-service-pem: \"{cert}\"\n  \
             tcp-idle-timeout: {idle_ms}\n  do-ip6: no\n  do-udp: yes\n  \
             username: \"\"\n  chroot: \"\"\n  directory: \"{dir}\"\n  pidfile: \"\"\n  \
             use-syslog: no\n  logfile: \"\"\n  do-daemonize: no\n  \
             do-not-query-localhost: yes\n  module-config: \"iterator\"\n  \
             access-control: 0.0.0.0/0 allow\n  \
             local-zone: \".\" static\n  local-zone: \"test.\" static\n{data}\
             remote-control:\n  control-enable: no\n",
            key = pki.key.display(),
            cert = pki.cert.display(),
            dir = dir.0.display(),
        );
        let conf_path = dir.0.join("unbound.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let log = std::fs::File::create(dir.0.join("unbound.log")).unwrap();
        // `ip netns exec` execs unbound in place: the child is unbound.
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unbound"]);
                c
            }
            None => Command::new("unbound"),
        };
        let child = cmd
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Some(Unbound {
            child,
            dot: (ip, dot).into(),
            doh: (ip, doh).into(),
            pki,
            dir,
        })
    }

    /// What unbound logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("unbound.log")).unwrap_or_default()
    }

    /// Established TCP connections to `port` now, counted by `ss` (in
    /// this process's namespace).
    pub fn connections_to(port: u16) -> usize {
        let out = Command::new("ss")
            .args([
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}
