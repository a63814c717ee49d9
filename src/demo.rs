//! `tproxyd demo`: shows tproxyd at work on a bare machine, as root, and
//! leaves nothing behind.
//!
//! It builds three throw-away network namespaces (a LAN client, a router
//! running tproxyd with the rules it installs itself, a WAN side with
//! servers on documentation addresses), sends real TCP and UDP traffic over
//! IPv4 and IPv6 from the client, and shows from both ends that each flow
//! went through tproxyd: the server saw it arrive from the router's address
//! (plain forwarding would show the client's), and tproxyd logged it. Then
//! it stops tproxyd, shows its rules are gone, and deletes the namespaces,
//! also on Ctrl-C. Nothing outside its namespaces is touched, and no packet
//! leaves them.
//!
//! The outbound is `direct`, so the demo needs no SOCKS5 server.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use tproxyd::testbed::{self, Bed, Netns};

const PORT: u16 = 1090;

struct Demo {
    prefix: String,
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    tproxyd: Option<Child>,
    /// The namespaces, once built (see `tproxyd::testbed`).
    bed: Option<Bed>,
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Demo {
    fn ns(&self, role: &str) -> &Netns {
        let bed = self.bed.as_ref().expect("the test bed is built first");
        match role {
            "lan" => &bed.lan,
            "rtr" => &bed.router,
            _ => &bed.wan,
        }
    }

    fn exec(&self, role: &str, args: &[&str]) -> Result<String> {
        self.ns(role).exec(args)
    }

    /// Runs `f` on a thread inside namespace `role`; sockets it makes
    /// stay in that namespace.
    fn enter<T: Send>(&self, role: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        self.ns(role).enter(f)?
    }

    fn build(&mut self) -> Result<()> {
        self.bed = Some(Bed::up(&self.prefix, &testbed::Options::default())?);
        Ok(())
    }

    /// TCP :80 and UDP :53 on the "internet" addresses; each answer starts
    /// with the address the server saw the flow come from.
    fn start_servers(&self) -> Result<()> {
        let (tcp, udp) = self.enter("wan", || {
            let mut tcp = Vec::new();
            let mut udp = Vec::new();
            for ip in [testbed::REMOTE_A_V4, testbed::REMOTE_A_V6] {
                let ip: std::net::IpAddr = ip.parse()?;
                tcp.push(TcpListener::bind(SocketAddr::new(ip, 80))?);
                udp.push(UdpSocket::bind(SocketAddr::new(ip, 53))?);
            }
            Ok((tcp, udp))
        })?;
        for l in tcp {
            l.set_nonblocking(true)?;
            let stop = Arc::clone(&self.stop);
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, peer)) => {
                            let _ = s.set_nonblocking(false);
                            let mut req = Vec::new();
                            let _ = s.read_to_end(&mut req);
                            let _ = s.write_all(format!("server saw {peer}").as_bytes());
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        for s in udp {
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let stop = Arc::clone(&self.stop);
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(format!("server saw {peer}").as_bytes(), peer);
                    }
                }
            });
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tproxyd.log")).unwrap_or_default()
    }

    fn start_tproxyd(&mut self, backend: &str) -> Result<()> {
        let exe = std::env::current_exe().context("cannot find the tproxyd binary")?;
        let log = File::create(self.dir.join("tproxyd.log"))?;
        let child = self
            .ns("rtr")
            .command(exe)
            .arg("run")
            .args(tproxyd_args(backend))
            .arg("--verbose")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start tproxyd in the router namespace")?;
        self.tproxyd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains("tproxyd listening") {
            if let Some(Ok(Some(status))) = self.tproxyd.as_mut().map(|c| c.try_wait()) {
                bail!("tproxyd exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("tproxyd did not start:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop_tproxyd(&mut self) -> Result<()> {
        if let Some(mut child) = self.tproxyd.take() {
            // ip netns exec replaced itself with tproxyd: same pid.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let status = child.wait()?;
            if !status.success() {
                bail!("tproxyd exited with {status}:\n{}", self.log());
            }
        }
        Ok(())
    }

    fn tcp(&self, dst: SocketAddr) -> Result<String> {
        self.enter("lan", || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                .with_context(|| format!("connect to {dst}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            s.shutdown(Shutdown::Write)?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer)
        })
    }

    fn udp(&self, bind: &str, dst: SocketAddr) -> Result<(String, SocketAddr)> {
        let bind: SocketAddr = bind.parse()?;
        self.enter("lan", || {
            let s = UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.send_to(b"question", dst)?;
            let mut buf = [0u8; 512];
            let (n, from) = s
                .recv_from(&mut buf)
                .with_context(|| format!("no UDP answer from {dst}"))?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        })
    }
}

/// Which firewall backend this machine can use: nftables spoken over
/// netlink (no `nft` binary needed) when the kernel has nf_tables, else
/// iptables-restore.
fn pick_backend() -> Result<&'static str> {
    match tproxyd::firewall::nft::present() {
        Ok(_) => Ok("nftables"),
        Err(nft_error) => {
            if Command::new("iptables-restore")
                .arg("--version")
                .output()
                .is_ok()
            {
                Ok("iptables")
            } else {
                bail!("the kernel answers no nf_tables requests ({nft_error}) and iptables-restore is not installed; load nf_tables (modprobe nf_tables) or install iptables, and run the demo again")
            }
        }
    }
}

/// Whether a program can be run at all (installed, executable).
fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// tproxyd's settings in the router (after `run` or `rules print`).
fn tproxyd_args(backend: &str) -> Vec<String> {
    [
        "--listen",
        &format!("[::]:{PORT}"),
        "--mode",
        "tproxy",
        "--direct",
        "--firewall",
        backend,
        "--lan-interface",
        testbed::ROUTER_LAN_IF,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn check(label: &str, answer: &str, router: &str, client: &str) -> Result<()> {
    let seen = answer.trim_start_matches("server saw ");
    let seen_ip = seen
        .rsplit_once(':')
        .map(|(ip, _)| ip.trim_matches(['[', ']']))
        .unwrap_or(seen);
    if seen_ip == router {
        println!("  ok  {label}: the server saw the flow from {seen}, the router's address: tproxyd relayed it");
        Ok(())
    } else if seen_ip == client {
        bail!("{label}: the server saw the client's own address {seen}: the flow was forwarded, not proxied")
    } else {
        bail!("{label}: unexpected answer {answer:?}")
    }
}

fn scenario(demo: &mut Demo, hold: bool, interrupted: &AtomicBool) -> Result<()> {
    let backend = pick_backend()?;
    println!(
        "1. building namespaces {0}-lan (client), {0}-rtr (router), {0}-wan (servers)",
        demo.prefix
    );
    demo.build()?;
    demo.start_servers()?;
    println!(
        "2. starting tproxyd in the router; it installs its own {backend} rules and policy routes"
    );
    demo.start_tproxyd(backend)?;
    let rules = match backend {
        "nftables" if installed("nft") => {
            demo.exec("rtr", &["nft", "list", "table", "inet", "tproxyd"])?
        }
        "nftables" => {
            // No nft here: read the table's capture rules back over netlink.
            let listing = demo
                .enter("rtr", || Ok(tproxyd::firewall::nft::installed_listing()))?
                .context("tproxyd's table is missing in the router")?;
            let exe = std::env::current_exe().context("cannot find the tproxyd binary")?;
            let exe = exe.to_string_lossy();
            let mut print = vec![exe.as_ref(), "rules", "print"];
            let args = tproxyd_args(backend);
            print.extend(args.iter().map(String::as_str));
            let text = sh(&print)?;
            let table: String = text
                .lines()
                .skip_while(|l| !l.starts_with("table inet tproxyd {"))
                .take_while(|l| !l.is_empty())
                .map(|l| format!("{l}\n"))
                .collect();
            format!(
                "(nft is not installed: the table as `tproxyd rules print` shows it; read back over netlink, its capture rules are: {})\n{table}",
                listing.lines().collect::<Vec<_>>().join("; ")
            )
        }
        _ => demo.exec("rtr", &["iptables-save", "-t", "mangle"])?,
    };
    println!("   rules tproxyd installed:\n{}", indent(&rules));
    println!("3. traffic from the LAN client (192.0.2.2, 2001:db8:1::2); no proxy setting on it");
    let v4: SocketAddr = "198.51.100.10:80".parse()?;
    let v6: SocketAddr = "[2001:db8:100::10]:80".parse()?;
    check(
        "TCP  IPv4 -> 198.51.100.10:80",
        &demo.tcp(v4)?,
        "203.0.113.1",
        "192.0.2.2",
    )?;
    check(
        "TCP  IPv6 -> [2001:db8:100::10]:80",
        &demo.tcp(v6)?,
        "2001:db8:2::1",
        "2001:db8:1::2",
    )?;
    for (label, bind, dst, router, client) in [
        (
            "UDP  IPv4 -> 198.51.100.10:53",
            "192.0.2.2:0",
            "198.51.100.10:53",
            "203.0.113.1",
            "192.0.2.2",
        ),
        (
            "UDP  IPv6 -> [2001:db8:100::10]:53",
            "[2001:db8:1::2]:0",
            "[2001:db8:100::10]:53",
            "2001:db8:2::1",
            "2001:db8:1::2",
        ),
    ] {
        let dst: SocketAddr = dst.parse()?;
        let (answer, from) = demo.udp(bind, dst)?;
        if from != dst {
            bail!("{label}: the answer came from {from}, not from {dst}");
        }
        check(label, &answer, router, client)?;
    }
    println!("4. what tproxyd logged for those flows:");
    for line in demo
        .log()
        .lines()
        .filter(|l| l.contains(" flow ") || l.contains(" session open "))
    {
        println!(
            "   {}",
            line.split_once(" DEBUG ").map_or(line, |(_, rest)| rest)
        );
    }
    if hold {
        println!("holding: look around with `ip netns exec {}-rtr nft list ruleset` (if nft is installed); press Ctrl-C to remove everything", demo.prefix);
        while !interrupted.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50));
        }
        return Ok(());
    }
    println!("5. stopping tproxyd (SIGTERM); it removes its rules and routes");
    demo.stop_tproxyd()?;
    let left = match backend {
        "nftables" => {
            let present = demo.enter("rtr", || {
                tproxyd::firewall::nft::present().map_err(anyhow::Error::from)
            })?;
            if present {
                "table inet tproxyd".to_string()
            } else {
                String::new()
            }
        }
        _ => demo
            .exec("rtr", &["iptables-save", "-t", "mangle"])?
            .lines()
            .filter(|l| l.contains("TPROXYD"))
            .collect(),
    };
    let left_rules = demo.exec("rtr", &["ip", "rule"])?;
    if left.contains("tproxyd") || left.contains("TPROXYD") || left_rules.contains("0x1090") {
        bail!("tproxyd left rules behind:\n{left}\n{left_rules}");
    }
    println!("  ok  no tproxyd table, chain or ip rule is left in the router");
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("     {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the demo. With `hold`, waits for Ctrl-C before cleaning up.
pub fn run(hold: bool) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and firewall rules inside them: run it as root (sudo)");
    }
    sh(&["ip", "-V"]).context("the demo needs iproute2 (the ip command)")?;
    // Ctrl-C and SIGTERM are taken by a thread of ours, so the clean-up
    // below runs instead of the process dying with namespaces left over.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("cannot block signals")?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let prefix = format!("tpdemo{}", std::process::id());
    {
        let interrupted = Arc::clone(&interrupted);
        let prefix = prefix.clone();
        let hold_mode = hold;
        thread::spawn(move || {
            if signals.wait().is_ok() {
                interrupted.store(true, Ordering::Relaxed);
                if !hold_mode {
                    println!("\ninterrupted: removing the demo's namespaces");
                    let _ = testbed::teardown(&prefix);
                    std::process::exit(130);
                }
            }
        });
    }
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir)?;
    let mut demo = Demo {
        prefix: prefix.clone(),
        dir: dir.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        tproxyd: None,
        bed: None,
    };
    let result = scenario(&mut demo, hold, &interrupted);
    demo.stop.store(true, Ordering::Relaxed);
    if let Some(mut c) = demo.tproxyd.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let down = match demo.bed.take() {
        Some(bed) => bed.down(),
        None => testbed::teardown(&prefix),
    };
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = down {
        bail!("could not remove every demo namespace: {e:#}");
    }
    println!("6. namespaces removed; nothing was changed outside them");
    result
}
