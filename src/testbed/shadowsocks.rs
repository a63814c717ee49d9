//! The reference shadowsocks servers in the bed's WAN namespace, for the
//! shadowsocks outbound's end-to-end tests: shadowsocks-libev's
//! `ss-server` (Debian's package; AEAD methods only) and
//! shadowsocks-rust's `ssserver` (built once by scripts/setup-test-deps
//! into [`SS_RUST_BIN`]; all six methods). Each listens for TCP and UDP
//! on the WAN host's IPv4 and IPv6 addresses, on a port free in that
//! namespace, logs to a file the tests print on failure, and is stopped
//! when dropped (the bed kills whatever is left with the namespace).
//!
//! Their command lines spell UDP differently: libev's `-u` is "TCP and
//! UDP" (`-U` UDP only), shadowsocks-rust's `-u` is "UDP only" (`-U` TCP
//! and UDP). The Rust server takes a JSON file here instead, which names
//! both listeners and `"mode": "tcp_and_udp"` in words.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::*;

/// Where scripts/setup-test-deps installs shadowsocks-rust's `ssserver`
/// and `sslocal` (bench/bench.py names the same directory).
pub const SS_RUST_BIN: &str = "/var/cache/tproxyd-test/shadowsocks-rust-1.25.0/bin";
/// shadowsocks-libev's server, from Debian's `shadowsocks-libev`.
pub const SS_LIBEV_SERVER: &str = "/usr/bin/ss-server";

/// The AEAD methods (SIP004), which both servers speak.
pub const AEAD_METHODS: [&str; 3] = ["aes-128-gcm", "aes-256-gcm", "chacha20-ietf-poly1305"];
/// The 2022 methods (SIP022): shadowsocks-rust only.
pub const METHODS_2022: [&str; 3] = [
    "2022-blake3-aes-128-gcm",
    "2022-blake3-aes-256-gcm",
    "2022-blake3-chacha20-poly1305",
];

/// A shadowsocks-rust binary (`ssserver`, `sslocal`) in [`SS_RUST_BIN`].
pub fn ss_rust_bin(name: &str) -> PathBuf {
    Path::new(SS_RUST_BIN).join(name)
}

/// Which reference server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SsImpl {
    /// shadowsocks-libev's `ss-server`.
    Libev,
    /// shadowsocks-rust's `ssserver`.
    Rust,
}

impl SsImpl {
    pub fn binary(self) -> PathBuf {
        match self {
            SsImpl::Libev => PathBuf::from(SS_LIBEV_SERVER),
            SsImpl::Rust => ss_rust_bin("ssserver"),
        }
    }

    /// The program's name, as the tests' messages say it.
    pub fn name(self) -> &'static str {
        match self {
            SsImpl::Libev => "ss-server",
            SsImpl::Rust => "ssserver",
        }
    }

    /// The methods this server speaks (of the six tproxyd has).
    pub fn methods(self) -> Vec<&'static str> {
        match self {
            SsImpl::Libev => AEAD_METHODS.to_vec(),
            SsImpl::Rust => AEAD_METHODS.iter().chain(&METHODS_2022).copied().collect(),
        }
    }

    /// Ok if the binary is installed, else what to run to install it.
    pub fn check_installed(self) -> Result<()> {
        let bin = self.binary();
        if !bin.exists() {
            bail!(
                "{} is missing: scripts/setup-test-deps installs it ({})",
                bin.display(),
                match self {
                    SsImpl::Libev => "Debian package shadowsocks-libev",
                    SsImpl::Rust => "cargo install shadowsocks-rust, cached",
                }
            );
        }
        Ok(())
    }
}

/// A key that suits `method`: 2022 methods take base64 of exactly their
/// key length (16 or 32 bytes), AEAD methods any password. Derived from
/// `seed` so different tests (and a deliberately wrong one) differ.
pub fn password_for(method: &str, seed: &str) -> String {
    if !method.starts_with("2022-") {
        return format!("ss-e2e-{seed}-pw");
    }
    let len = if method.contains("aes-128") { 16 } else { 32 };
    let mut key = Vec::with_capacity(len);
    let mut x: u64 = seed.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    while key.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        key.extend_from_slice(&x.to_le_bytes());
    }
    key.truncate(len);
    base64_std(&key)
}

/// Standard base64 with padding (what SIP022 keys are written in).
fn base64_std(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A port free for TCP and UDP on both WAN host addresses in `wan`.
fn free_port(wan: &Netns) -> Result<u16> {
    let v4: SocketAddr = SocketAddr::new(SOCKS_V4.parse()?, 0);
    let v6: SocketAddr = SocketAddr::new(SOCKS_V6.parse()?, 0);
    wan.enter(|| {
        for _ in 0..50 {
            let probe = TcpListener::bind(v4)?;
            let port = probe.local_addr()?.port();
            let with = |a: SocketAddr| SocketAddr::new(a.ip(), port);
            let free = TcpListener::bind(with(v6)).is_ok()
                && UdpSocket::bind(with(v4)).is_ok()
                && UdpSocket::bind(with(v6)).is_ok();
            if free {
                return Ok(port);
            }
        }
        bail!("no port free for TCP and UDP on {SOCKS_V4} and {SOCKS_V6}")
    })?
}

/// One reference server in the WAN namespace, TCP and UDP, listening on
/// `SOCKS_V4:port` and `[SOCKS_V6]:port`. Stopped when dropped.
#[derive(Debug)]
pub struct SsServer {
    pub kind: SsImpl,
    pub method: String,
    pub password: String,
    port: u16,
    wan: Netns,
    dir: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl SsServer {
    /// Starts `kind` in `wan` with `method` and `password`, its files in
    /// `dir`, on a free port, and waits until it listens (TCP and UDP,
    /// both families).
    pub fn start(
        wan: &Netns,
        dir: &Path,
        kind: SsImpl,
        method: &str,
        password: &str,
    ) -> Result<SsServer> {
        kind.check_installed()?;
        let mut server = SsServer {
            kind,
            method: method.to_string(),
            password: password.to_string(),
            port: free_port(wan)?,
            wan: Netns::named(wan.name()),
            dir: dir.to_path_buf(),
            child: None,
            starts: 0,
        };
        server.spawn()?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The IPv4 listener, `203.0.113.2:PORT`.
    pub fn addr_v4(&self) -> SocketAddr {
        SocketAddr::new(SOCKS_V4.parse().expect("constant"), self.port)
    }

    /// The IPv6 listener, `[2001:db8:2::2]:PORT`.
    pub fn addr_v6(&self) -> SocketAddr {
        SocketAddr::new(SOCKS_V6.parse().expect("constant"), self.port)
    }

    /// The file its output goes to (every start appends).
    pub fn log_path(&self) -> PathBuf {
        self.dir
            .join(format!("{}-{}.log", self.kind.name(), self.port))
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the process is running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("open {}", self.log_path().display()))?;
        writeln!(log, "==== start {} ====", self.starts)?;
        let mut cmd = self.wan.command(self.kind.binary());
        match self.kind {
            SsImpl::Libev => {
                // -u: TCP *and* UDP (libev's letters); -s twice: both
                // families; -v: the authentication errors in the log.
                cmd.args(["-s", SOCKS_V4, "-s", SOCKS_V6, "-p"])
                    .arg(self.port.to_string())
                    .args(["-k", &self.password, "-m", &self.method, "-u", "-v"]);
            }
            SsImpl::Rust => {
                let conf = self.dir.join(format!("ssserver-{}.json", self.port));
                let server = |ip: &str| {
                    format!(
                        "{{\"server\": \"{ip}\", \"server_port\": {}, \"method\": \"{}\", \
                         \"password\": \"{}\", \"mode\": \"tcp_and_udp\"}}",
                        self.port,
                        self.method.escape_default(),
                        self.password.escape_default()
                    )
                };
                std::fs::write(
                    &conf,
                    format!(
                        "{{\"servers\": [{}, {}]}}\n",
                        server(SOCKS_V4),
                        server(SOCKS_V6)
                    ),
                )
                .with_context(|| format!("write {}", conf.display()))?;
                cmd.arg("-c").arg(&conf).arg("-v");
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.kind.name()))?;
        self.child = Some(child);
        self.wait_listening(Duration::from_secs(10))
    }

    /// Waits until TCP accepts on both addresses and both UDP sockets are
    /// bound (as `ss` lists them in the namespace).
    fn wait_listening(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let (v4, v6) = (self.addr_v4(), self.addr_v6());
        loop {
            let tcp = self.wan.enter(|| {
                [v4, v6]
                    .iter()
                    .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
            })?;
            let udp = self
                .wan
                .exec(&["ss", "-Hlnu", &format!("sport = :{}", self.port)])
                .map(|out| out.lines().count() >= 2)
                .unwrap_or(false);
            if tcp && udp {
                return Ok(());
            }
            if !self.running() {
                bail!("{} exited at start:\n{}", self.kind.name(), self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {v4} and {v6} (TCP {tcp}, UDP {udp}) within {within:?}:\n{}",
                    self.kind.name(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after 5 s) and reaps it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // `ip netns exec` execs the server in place: the pid is its own.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops it and starts it again on the same port: a server restart.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for SsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} {} on port {} (log) ----\n{}",
                self.kind.name(),
                self.method,
                self.port,
                self.log()
            );
        }
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_for_2022_are_base64_of_the_key_length() {
        let k16 = password_for("2022-blake3-aes-128-gcm", "a");
        let k32 = password_for("2022-blake3-chacha20-poly1305", "a");
        assert_eq!(k16.len(), 24);
        assert!(k16.ends_with("=="));
        assert_eq!(k32.len(), 44);
        assert!(k32.ends_with('='));
        assert_ne!(password_for("2022-blake3-aes-128-gcm", "b"), k16);
        assert_eq!(password_for("aes-128-gcm", "x"), "ss-e2e-x-pw");
        assert_eq!(base64_std(b"test"), "dGVzdA==");
        assert_eq!(base64_std(b"tes"), "dGVz");
    }

    #[test]
    fn libev_lacks_2022_and_rust_has_all_six() {
        assert_eq!(SsImpl::Libev.methods().len(), 3);
        assert_eq!(SsImpl::Rust.methods().len(), 6);
        assert!(ss_rust_bin("sslocal").starts_with(SS_RUST_BIN));
    }
}
