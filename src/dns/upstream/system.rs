//! `system`: the resolvers the router itself uses, from the `nameserver`
//! lines of `/etc/resolv.conf` (at most three, as the C library reads
//! them), asked over UDP ([`super::udp`]) in their order: the next one
//! when one does not answer within its share of the time. The file is
//! read again when its modification time changes (DHCP and PPP rewrite
//! it), looked at no more than once a second.
//!
//! The loop: on OpenWrt `/etc/resolv.conf` names dnsmasq
//! (`nameserver 127.0.0.1`), and dnsmasq may forward to tproxyd's own
//! listener; asking it would send the query round forever. So when every
//! nameserver in the file is a loopback address and netifd's list of the
//! upstream resolvers (`/tmp/resolv.conf.d/resolv.conf.auto`, or
//! `/tmp/resolv.conf.auto` on older releases) exists, that list is used
//! instead. Elsewhere (a loopback stub such as systemd-resolved's
//! 127.0.0.53) the file is taken as it is; a file naming tproxyd's own
//! listener is refused where the config is loaded
//! ([`own_listener_named`], `crate::dns::check_system_servers`): the
//! query would come back and wait for itself until the timeout.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::time::Instant as Deadline;
use tracing::{debug, info};

use super::udp::UdpResolver;
use super::Cause;
use crate::outbound::Outbound;

/// The file the C library reads.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// OpenWrt's lists of the upstream resolvers (netifd writes them; the
/// first on current releases).
pub const OPENWRT_AUTO: [&str; 2] = [
    "/tmp/resolv.conf.d/resolv.conf.auto",
    "/tmp/resolv.conf.auto",
];
/// At most this many nameservers are used (the C library's MAXNS).
pub const MAX_NAMESERVERS: usize = 3;
/// The file is looked at (its modification time) at most this often.
const RECHECK: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct State {
    checked: Option<Instant>,
    /// Every file consulted at the last read, with its modification time
    /// then (None: absent).
    seen: Vec<(PathBuf, Option<SystemTime>)>,
    servers: Vec<Arc<UdpResolver>>,
    /// Why there are none, when there are none.
    problem: Option<String>,
}

pub(crate) struct System {
    path: PathBuf,
    fallbacks: Vec<PathBuf>,
    state: Mutex<State>,
}

impl System {
    pub(crate) fn new() -> System {
        System::at(
            PathBuf::from(RESOLV_CONF),
            OPENWRT_AUTO.iter().map(PathBuf::from).collect(),
        )
    }

    /// Reading `path`, and the first of `fallbacks` that has nameservers
    /// when `path` lists loopback addresses only.
    pub(crate) fn at(path: PathBuf, fallbacks: Vec<PathBuf>) -> System {
        System {
            path,
            fallbacks,
            state: Mutex::default(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn nameservers(&self) -> Vec<SocketAddr> {
        self.current()
            .map(|s| s.iter().map(|r| r.server()).collect())
            .unwrap_or_default()
    }

    pub(crate) fn retain(&self, keep: &dyn Fn(u32) -> bool) {
        for s in &lock(&self.state).servers {
            s.retain(keep);
        }
    }

    /// Asks the nameservers in turn, each until its share of the time
    /// left runs out.
    pub(crate) async fn exchange(
        &self,
        query: &[u8],
        key: u32,
        outbound: &Arc<Outbound>,
        deadline: Deadline,
    ) -> Result<Vec<u8>, Cause> {
        let servers = self.current()?;
        let mut last = Cause::NoServers("no nameserver asked".into());
        for (i, server) in servers.iter().enumerate() {
            let now = Deadline::now();
            if now >= deadline {
                break;
            }
            let left = u32::try_from(servers.len() - i).unwrap_or(1);
            let until = now + deadline.saturating_duration_since(now) / left;
            match server.exchange(query, key, outbound, until).await {
                Ok(answer) => return Ok(answer),
                Err(c) => {
                    debug!(nameserver = %server.server(), "system resolver: {c}; trying the next");
                    last = c;
                }
            }
        }
        Err(last)
    }

    /// The nameservers, the file read again first if it changed.
    fn current(&self) -> Result<Vec<Arc<UdpResolver>>, Cause> {
        let mut st = lock(&self.state);
        let due = st.checked.is_none_or(|t| t.elapsed() >= RECHECK);
        if due {
            st.checked = Some(Instant::now());
            let changed = st.seen.is_empty() || st.seen.iter().any(|(p, m)| modified(p) != *m);
            if changed {
                self.reread(&mut st);
            }
        }
        if st.servers.is_empty() {
            return Err(Cause::NoServers(st.problem.clone().unwrap_or_else(|| {
                format!("{} lists no nameserver", self.path.display())
            })));
        }
        Ok(st.servers.clone())
    }

    fn reread(&self, st: &mut State) {
        let (addrs, seen, problem) = read(&self.path, &self.fallbacks);
        // Resolvers already known keep their sockets.
        let servers = addrs
            .iter()
            .map(|a| {
                st.servers
                    .iter()
                    .find(|s| s.server() == *a)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(UdpResolver::new(*a)))
            })
            .collect();
        let from = seen
            .iter()
            .rev()
            .find(|(_, m)| m.is_some())
            .map_or(self.path.as_path(), |(p, _)| p.as_path());
        info!(file = %from.display(), nameservers = ?addrs, "system resolver: nameservers read");
        st.servers = servers;
        st.seen = seen;
        st.problem = problem;
    }
}

/// Whether `addr` is one of tproxyd's own `listen` addresses (a wildcard
/// listener takes loopback addresses on its port), as `check` judges a
/// `udp://` server.
pub fn is_own_listener(listen: &[SocketAddr], addr: SocketAddr) -> bool {
    listen.iter().any(|l| {
        l.port() == addr.port()
            && (l.ip() == addr.ip() || (l.ip().is_unspecified() && addr.ip().is_loopback()))
    })
}

/// The file `system` would read now and the first nameserver in it that
/// is one of tproxyd's own `listen` addresses: asking it would send every
/// query back to tproxyd, where it waits for itself until the timeout
/// (5 s, then SERVFAIL). Read as `system` reads it (OpenWrt's upstream
/// list instead of a loopback-only resolv.conf).
pub fn own_listener_named(listen: &[SocketAddr]) -> Option<(PathBuf, SocketAddr)> {
    own_listener_in(&System::new(), listen)
}

pub(crate) fn own_listener_in(
    system: &System,
    listen: &[SocketAddr],
) -> Option<(PathBuf, SocketAddr)> {
    if listen.is_empty() {
        return None;
    }
    let (addrs, seen, _) = read(&system.path, &system.fallbacks);
    let from = seen
        .iter()
        .rev()
        .find(|(_, m)| m.is_some())
        .map_or(system.path.clone(), |(p, _)| p.clone());
    addrs
        .into_iter()
        .find(|a| is_own_listener(listen, *a))
        .map(|a| (from, a))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// What [`System`] reads: the nameservers, every file consulted with its
/// modification time, and why there are none.
#[allow(clippy::type_complexity)]
fn read(
    path: &Path,
    fallbacks: &[PathBuf],
) -> (
    Vec<SocketAddr>,
    Vec<(PathBuf, Option<SystemTime>)>,
    Option<String>,
) {
    let mut seen = vec![(path.to_path_buf(), modified(path))];
    let servers = match std::fs::read_to_string(path) {
        Ok(text) => nameservers(&text, &crate::sys::interface_index),
        Err(e) => {
            let why = format!("cannot read {}: {e}", path.display());
            return (Vec::new(), seen, Some(why));
        }
    };
    if !servers.is_empty() && servers.iter().all(|s| s.ip().is_loopback()) {
        for fallback in fallbacks {
            let m = modified(fallback);
            seen.push((fallback.clone(), m));
            if m.is_none() {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(fallback) else {
                continue;
            };
            let upstream = nameservers(&text, &crate::sys::interface_index);
            if !upstream.is_empty() {
                debug!(
                    "{} lists only loopback resolvers (dnsmasq, which may forward to tproxyd): the upstream ones in {} are used",
                    path.display(),
                    fallback.display()
                );
                return (upstream, seen, None);
            }
        }
    }
    (servers, seen, None)
}

/// The `nameserver` addresses of a resolv.conf (port 53), the first
/// [`MAX_NAMESERVERS`] usable ones. An IPv6 scope (`fe80::1%eth0`, or a
/// number) is kept for link-local addresses, which need it, with
/// `index_of` turning an interface name into its index; a link-local
/// address whose interface is unknown is left out, and the scope of any
/// other address dropped. Lines that do not parse are skipped, as the C
/// library skips them.
pub fn nameservers(text: &str, index_of: &dyn Fn(&str) -> Option<u32>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else { continue };
        if let Some(addr) = nameserver(word, index_of) {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        if out.len() >= MAX_NAMESERVERS {
            break;
        }
    }
    out
}

fn nameserver(word: &str, index_of: &dyn Fn(&str) -> Option<u32>) -> Option<SocketAddr> {
    let (ip, scope) = match word.split_once('%') {
        Some((ip, scope)) => (ip, Some(scope)),
        None => (word, None),
    };
    let ip: IpAddr = ip.parse().ok()?;
    let addr = crate::sys::normalize(SocketAddr::new(ip, 53));
    let SocketAddr::V6(v6) = addr else {
        // An IPv4 address has no scope; one written with it is a typo.
        return scope.is_none().then_some(addr);
    };
    let link_local = (v6.ip().segments()[0] & 0xffc0) == 0xfe80;
    if !link_local {
        return Some(addr);
    }
    let index = match scope {
        None => return None,
        Some(s) => s.parse::<u32>().ok().or_else(|| index_of(s))?,
    };
    Some(SocketAddr::V6(SocketAddrV6::new(*v6.ip(), 53, 0, index)))
}
