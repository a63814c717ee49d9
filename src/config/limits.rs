//! `[timeouts]` and `[limits]`: how long flows idle and how many there may be.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    /// DNS sessions are one question and one answer: keeping them for the
    /// full UDP timeout only fills the session table.
    pub udp_dns_idle: Duration,
    /// Idle timeout of a session that never got a reply: a flood of new
    /// client ports (or a scan) is mostly such sessions, and they must not
    /// hold table slots as long as live ones.
    pub udp_unreplied: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most UDP sessions (client address:port) at once; new clients beyond
    /// it are refused with a warning rather than growing without bound.
    pub udp_sessions: usize,
    /// Most UDP sessions of one client address (all its ports): one host
    /// flooding new ports must not take the whole table, and with it every
    /// other host's DNS.
    pub udp_sessions_per_client: usize,
    /// Most cached reply sockets (one per remote address:port).
    pub udp_reply_sockets: usize,
    /// Threads that run the relay. The kernel does most of the work per
    /// byte and per datagram; on a small router the other cores are busy
    /// forwarding and taking interrupts, and a second relay thread there
    /// measured slower, not faster (bench/RESULTS.md).
    pub threads: usize,
    /// Most TCP flows at once; connections beyond it are reset at once
    /// rather than holding descriptors the open flows need.
    pub tcp_flows: usize,
    /// Most TCP connects in progress (upstream not yet answered) from one
    /// client address: 5,000 connects to a blackholed address must not
    /// hold 10,000 descriptors for the whole connect timeout.
    pub tcp_connecting_per_client: usize,
}

/// Threads when the config names none: half the cores, at least one.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).max(1)
}

pub const DEFAULT_CONNECT_TIMEOUT: u64 = 10;
pub const DEFAULT_TCP_IDLE: u64 = 300;
pub const DEFAULT_UDP_IDLE: u64 = 60;
pub const DEFAULT_UDP_DNS_IDLE: u64 = 10;
/// Linux conntrack keeps an unreplied UDP flow a quarter as long as a
/// replied one (30 s against 120 s); the same ratio over 60 s is 15 s, and
/// 10 s matches the DNS timeout, whose sessions are the common unreplied ones.
pub const DEFAULT_UDP_UNREPLIED: u64 = 10;
/// Longest accepted timeout: a week. Longer values are almost certainly a
/// mistake, and bounding them keeps every deadline arithmetic in range.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Sized for a small router: a few hundred LAN devices with a handful of
/// UDP flows each. Each session costs a socket (two with SOCKS5).
pub const DEFAULT_UDP_SESSIONS: usize = 4096;
pub const DEFAULT_UDP_REPLY_SOCKETS: usize = 1024;
/// A quarter of the table per client address unless set.
pub const DEFAULT_UDP_SESSIONS_SHARE: usize = 4;
pub const DEFAULT_TCP_FLOWS: usize = 16_384;
pub const DEFAULT_TCP_CONNECTING_PER_CLIENT: usize = 256;
/// Upper bounds on counts: each is far past what one box can serve, and
/// keeps a typo (or `u64::MAX`) from reaching an allocation or a thread
/// spawn.
pub const MAX_TABLE_ENTRIES: usize = 1 << 20;
pub const MAX_THREADS: usize = 256;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<u64>,
    pub tcp_idle: Option<u64>,
    pub udp_idle: Option<u64>,
    pub udp_dns_idle: Option<u64>,
    pub udp_unreplied: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub udp_sessions: Option<usize>,
    pub udp_sessions_per_client: Option<usize>,
    pub udp_reply_sockets: Option<usize>,
    pub threads: Option<usize>,
    pub tcp_flows: Option<usize>,
    pub tcp_connecting_per_client: Option<usize>,
}

impl RawTimeouts {
    pub(super) fn validate(&self, issue: &mut dyn FnMut(&str, String)) -> Timeouts {
        let secs = |key: &str,
                    v: Option<u64>,
                    default: u64,
                    issue: &mut dyn FnMut(&str, String)| {
            let v = v.unwrap_or(default);
            if v == 0 {
                issue(key, "must be at least 1 second".into());
            }
            if v > MAX_TIMEOUT_SECS {
                issue(
                    key,
                    format!("{v} seconds is more than a week ({MAX_TIMEOUT_SECS}); use a shorter timeout"),
                );
            }
            Duration::from_secs(v.min(MAX_TIMEOUT_SECS))
        };
        let t = self;
        Timeouts {
            connect: secs(
                "timeouts.connect",
                t.connect,
                DEFAULT_CONNECT_TIMEOUT,
                issue,
            ),
            tcp_idle: secs("timeouts.tcp_idle", t.tcp_idle, DEFAULT_TCP_IDLE, issue),
            udp_idle: secs("timeouts.udp_idle", t.udp_idle, DEFAULT_UDP_IDLE, issue),
            udp_dns_idle: secs(
                "timeouts.udp_dns_idle",
                t.udp_dns_idle,
                DEFAULT_UDP_DNS_IDLE,
                issue,
            ),
            udp_unreplied: secs(
                "timeouts.udp_unreplied",
                t.udp_unreplied,
                DEFAULT_UDP_UNREPLIED,
                issue,
            ),
        }
    }
}

impl RawLimits {
    pub(super) fn validate(&self, issue: &mut dyn FnMut(&str, String)) -> Limits {
        let l = self;
        let udp_sessions = l.udp_sessions.unwrap_or(DEFAULT_UDP_SESSIONS);
        let limits = Limits {
            udp_sessions,
            udp_sessions_per_client: l
                .udp_sessions_per_client
                .unwrap_or((udp_sessions / DEFAULT_UDP_SESSIONS_SHARE).max(1)),
            udp_reply_sockets: l.udp_reply_sockets.unwrap_or(DEFAULT_UDP_REPLY_SOCKETS),
            threads: l.threads.unwrap_or_else(default_threads),
            tcp_flows: l.tcp_flows.unwrap_or(DEFAULT_TCP_FLOWS),
            tcp_connecting_per_client: l
                .tcp_connecting_per_client
                .unwrap_or(DEFAULT_TCP_CONNECTING_PER_CLIENT),
        };
        for (key, value, max) in [
            (
                "limits.udp_sessions",
                limits.udp_sessions,
                MAX_TABLE_ENTRIES,
            ),
            (
                "limits.udp_sessions_per_client",
                limits.udp_sessions_per_client,
                MAX_TABLE_ENTRIES,
            ),
            (
                "limits.udp_reply_sockets",
                limits.udp_reply_sockets,
                MAX_TABLE_ENTRIES,
            ),
            ("limits.tcp_flows", limits.tcp_flows, MAX_TABLE_ENTRIES),
            (
                "limits.tcp_connecting_per_client",
                limits.tcp_connecting_per_client,
                MAX_TABLE_ENTRIES,
            ),
        ] {
            if value == 0 {
                issue(key, "must be at least 1".into());
            } else if value > max {
                issue(
                    key,
                    format!("{value} is more than the most allowed ({max})"),
                );
            }
        }
        if limits.udp_sessions_per_client > limits.udp_sessions {
            issue(
                "limits.udp_sessions_per_client",
                format!(
                    "{} is more than limits.udp_sessions ({}): one client could fill the table",
                    limits.udp_sessions_per_client, limits.udp_sessions
                ),
            );
        }
        if limits.tcp_connecting_per_client > limits.tcp_flows {
            issue(
                "limits.tcp_connecting_per_client",
                format!(
                    "{} is more than limits.tcp_flows ({})",
                    limits.tcp_connecting_per_client, limits.tcp_flows
                ),
            );
        }
        if limits.threads == 0 {
            issue(
                "limits.threads",
                "must be at least 1 (leave it out for half the cores)".into(),
            );
        } else if limits.threads > MAX_THREADS {
            issue(
                    "limits.threads",
                    format!(
                        "{} is more than {MAX_THREADS}; the relay measured fastest on half the cores (leave it out)",
                        limits.threads
                    ),
                );
        }
        limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{issues_of, no_env, no_fw};
    use crate::config::*;

    #[test]
    fn relay_threads_default_to_half_the_cores_and_zero_is_refused() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(default_threads(), (cores / 2).max(1));
        let base = "[outbound]\ntype = \"direct\"\n[limits]\n";
        let cfg = RawConfig::from_toml(&no_fw(&format!("{base}threads = 3\n")), "t.toml")
            .unwrap()
            .validate(&no_env)
            .unwrap();
        assert_eq!(cfg.limits.threads, 3);
        let issues = issues_of(&format!("{base}threads = 0\n"));
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "limits.threads");
        assert!(issues[0].message.contains("half the cores"), "{issues:?}");
    }

    #[test]
    fn timeouts_and_counts_past_their_bounds_are_refused() {
        let issues = issues_of(
            "[outbound]\ntype = \"direct\"\n[timeouts]\nudp_dns_idle = 18446744073709551615\n\
             [limits]\nthreads = 100000\nudp_sessions = 100\nudp_sessions_per_client = 200\n",
        );
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "timeouts.udp_dns_idle",
                "limits.udp_sessions_per_client",
                "limits.threads"
            ],
            "{issues:?}"
        );
    }
}
