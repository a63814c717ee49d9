//! Settings: read from TOML (`tproxyd run -c FILE`) or from the quick-start
//! flags, both turned into one validated [`Config`].
//!
//! Parsing is split in two: [`RawConfig`] is what serde reads (every field
//! optional, unknown keys refused), and [`RawConfig::validate`] turns it
//! into a [`Config`] or a list of errors, each naming the key it concerns,
//! so that `tproxyd check` can report every mistake in one pass.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// How TCP flows reach the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// mangle PREROUTING TPROXY: TCP and UDP, destination unchanged.
    Tproxy,
    /// nat REDIRECT: TCP only, destination read back from conntrack.
    Redirect,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Tproxy => "tproxy",
            Mode::Redirect => "redirect",
        })
    }
}

/// RFC 1929 username/password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    // Never print the password, not even in a debug dump of the config.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundConfig {
    Direct,
    Socks5 {
        server: SocketAddr,
        auth: Option<Credentials>,
    },
}

impl OutboundConfig {
    pub fn name(&self) -> &'static str {
        match self {
            OutboundConfig::Direct => "direct",
            OutboundConfig::Socks5 { .. } => "socks5",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    /// DNS sessions are one question and one answer: keeping them for the
    /// full UDP timeout only fills the session table.
    pub udp_dns_idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most UDP sessions (client address:port) at once; new clients beyond
    /// it are refused with a warning rather than growing without bound.
    pub udp_sessions: usize,
    /// Most cached reply sockets (one per remote address:port).
    pub udp_reply_sockets: usize,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub mode: Mode,
    pub tcp: bool,
    pub udp: bool,
    pub outbound: OutboundConfig,
    pub mark: u32,
    pub timeouts: Timeouts,
    pub limits: Limits,
}

pub const DEFAULT_LISTEN: &str = "[::]:1090";
pub const DEFAULT_MARK: u32 = 255;
pub const DEFAULT_CONNECT_TIMEOUT: u64 = 10;
pub const DEFAULT_TCP_IDLE: u64 = 300;
pub const DEFAULT_UDP_IDLE: u64 = 60;
pub const DEFAULT_UDP_DNS_IDLE: u64 = 10;
/// Sized for a small router: a few hundred LAN devices with a handful of
/// UDP flows each. Each session costs a socket (two with SOCKS5).
pub const DEFAULT_UDP_SESSIONS: usize = 4096;
pub const DEFAULT_UDP_REPLY_SOCKETS: usize = 1024;

/// The file as written: everything optional, unknown keys are errors.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub mode: Option<Mode>,
    pub tcp: Option<bool>,
    pub udp: Option<bool>,
    pub mark: Option<u32>,
    #[serde(default)]
    pub outbound: RawOutbound,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbound {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub server: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Name of an environment variable holding the password, so the secret
    /// need not be written into the file.
    pub password_env: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<u64>,
    pub tcp_idle: Option<u64>,
    pub udp_idle: Option<u64>,
    pub udp_dns_idle: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub udp_sessions: Option<usize>,
    pub udp_reply_sockets: Option<usize>,
}

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{}", .0.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigIssue>),
}

impl RawConfig {
    pub fn from_toml(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_string(),
            source: Box::new(e),
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_toml(&text, &shown)
    }

    /// Checks every key and returns the config, or every problem found.
    ///
    /// `env` looks up environment variables (injected so tests need not
    /// touch the process environment).
    pub fn validate(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut issues = Vec::new();
        let mut issue = |key: &'static str, message: String| {
            issues.push(ConfigIssue { key, message });
        };

        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                issue(
                    "listen",
                    "port 0 is not a fixed port the firewall rules could point at".into(),
                );
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                issue(
                    "listen",
                    format!("{listen_text:?} is not IP:PORT (for example \"[::]:1090\" or \"0.0.0.0:1090\")"),
                );
                None
            }
        };

        let mode = self.mode.unwrap_or(Mode::Tproxy);
        let tcp = self.tcp.unwrap_or(true);
        // REDIRECT cannot carry UDP: default UDP off there, refuse it if asked.
        let udp = self.udp.unwrap_or(mode == Mode::Tproxy);
        if mode == Mode::Redirect && udp {
            issue(
                "udp",
                "mode \"redirect\" serves TCP only: NAT REDIRECT keeps no per-datagram original \
                 destination; use mode = \"tproxy\" for UDP"
                    .into(),
            );
        }
        if !tcp && !udp {
            issue("tcp", "both tcp and udp are off: nothing to serve".into());
        }

        let mark = self.mark.unwrap_or(DEFAULT_MARK);
        if mark == 0 {
            issue(
                "mark",
                "must not be 0: the firewall rules tell tproxyd's own traffic apart by this mark, \
                 and 0 is every unmarked packet"
                    .into(),
            );
        }

        let outbound = self.outbound.validate(env, &mut issue);

        let secs = |key: &'static str,
                    v: Option<u64>,
                    default: u64,
                    issue: &mut dyn FnMut(&'static str, String)| {
            let v = v.unwrap_or(default);
            if v == 0 {
                issue(key, "must be at least 1 second".into());
            }
            Duration::from_secs(v)
        };
        let t = &self.timeouts;
        let timeouts = Timeouts {
            connect: secs(
                "timeouts.connect",
                t.connect,
                DEFAULT_CONNECT_TIMEOUT,
                &mut issue,
            ),
            tcp_idle: secs(
                "timeouts.tcp_idle",
                t.tcp_idle,
                DEFAULT_TCP_IDLE,
                &mut issue,
            ),
            udp_idle: secs(
                "timeouts.udp_idle",
                t.udp_idle,
                DEFAULT_UDP_IDLE,
                &mut issue,
            ),
            udp_dns_idle: secs(
                "timeouts.udp_dns_idle",
                t.udp_dns_idle,
                DEFAULT_UDP_DNS_IDLE,
                &mut issue,
            ),
        };

        let limits = Limits {
            udp_sessions: self.limits.udp_sessions.unwrap_or(DEFAULT_UDP_SESSIONS),
            udp_reply_sockets: self
                .limits
                .udp_reply_sockets
                .unwrap_or(DEFAULT_UDP_REPLY_SOCKETS),
        };
        if limits.udp_sessions == 0 {
            issue("limits.udp_sessions", "must be at least 1".into());
        }
        if limits.udp_reply_sockets == 0 {
            issue("limits.udp_reply_sockets", "must be at least 1".into());
        }

        match (listen, outbound) {
            (Some(listen), Some(outbound)) if issues.is_empty() => Ok(Config {
                listen,
                mode,
                tcp,
                udp,
                outbound,
                mark,
                timeouts,
                limits,
            }),
            _ => Err(ConfigError::Invalid(issues)),
        }
    }
}

impl RawOutbound {
    fn validate(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        issue: &mut dyn FnMut(&'static str, String),
    ) -> Option<OutboundConfig> {
        match self.kind.as_deref() {
            Some("direct") => {
                for (key, set) in [
                    ("outbound.server", self.server.is_some()),
                    ("outbound.username", self.username.is_some()),
                    ("outbound.password", self.password.is_some()),
                ] {
                    if set {
                        issue(
                            key,
                            "has no meaning with outbound.type = \"direct\"; remove it".into(),
                        );
                    }
                }
                Some(OutboundConfig::Direct)
            }
            Some("socks5") => {
                let server = match self.server.as_deref() {
                    None => {
                        issue(
                            "outbound.server",
                            "missing; outbound.type = \"socks5\" needs the server as IP:PORT"
                                .into(),
                        );
                        None
                    }
                    Some(text) => match text.parse::<SocketAddr>() {
                        Ok(a) => Some(a),
                        Err(_) => {
                            issue(
                                "outbound.server",
                                format!(
                                    "{text:?} is not IP:PORT; give the server's address, not a \
                                     name (a name would be resolved through the DNS tproxyd may \
                                     itself be capturing)"
                                ),
                            );
                            None
                        }
                    },
                };
                // Err: the password problem is reported already, so the
                // username check below must not report it a second time.
                let password: Result<Option<String>, ()> =
                    match (&self.password, &self.password_env) {
                        (Some(_), Some(_)) => {
                            issue(
                                "outbound.password",
                                "set either password or password_env, not both".into(),
                            );
                            Err(())
                        }
                        (Some(p), None) => Ok(Some(p.clone())),
                        (None, Some(var)) => match env(var) {
                            Some(p) => Ok(Some(p)),
                            None => {
                                issue(
                                    "outbound.password_env",
                                    format!("environment variable {var} is not set"),
                                );
                                Err(())
                            }
                        },
                        (None, None) => Ok(None),
                    };
                let auth = match (&self.username, password) {
                    (_, Err(())) | (None, Ok(None)) => None,
                    (Some(u), Ok(Some(p))) => {
                        // RFC 1929 carries each in one length byte.
                        if u.is_empty() || u.len() > 255 {
                            issue(
                                "outbound.username",
                                "must be 1 to 255 bytes (RFC 1929)".into(),
                            );
                        }
                        if p.is_empty() || p.len() > 255 {
                            issue(
                                "outbound.password",
                                "must be 1 to 255 bytes (RFC 1929)".into(),
                            );
                        }
                        Some(Credentials {
                            username: u.clone(),
                            password: p,
                        })
                    }
                    (Some(_), Ok(None)) => {
                        issue(
                            "outbound.password",
                            "username is set but no password".into(),
                        );
                        None
                    }
                    (None, Ok(Some(_))) => {
                        issue(
                            "outbound.username",
                            "password is set but no username".into(),
                        );
                        None
                    }
                };
                server.map(|server| OutboundConfig::Socks5 { server, auth })
            }
            Some(other) => {
                issue(
                    "outbound.type",
                    format!("unknown outbound {other:?}; expected \"direct\" or \"socks5\""),
                );
                None
            }
            None => {
                issue(
                    "outbound.type",
                    "missing; set \"direct\" or \"socks5\"".into(),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn issues_of(text: &str) -> Vec<ConfigIssue> {
        match RawConfig::from_toml(text, "t.toml")
            .unwrap()
            .validate(&no_env)
        {
            Err(ConfigError::Invalid(v)) => v,
            other => panic!("expected validation issues, got {other:?}"),
        }
    }

    #[test]
    fn minimal_socks5_config_gets_defaults() {
        let cfg = RawConfig::from_toml(
            "[outbound]\ntype = \"socks5\"\nserver = \"203.0.113.2:1080\"\n",
            "t.toml",
        )
        .unwrap()
        .validate(&no_env)
        .unwrap();
        assert_eq!(cfg.listen, "[::]:1090".parse().unwrap());
        assert_eq!(cfg.mode, Mode::Tproxy);
        assert!(cfg.tcp && cfg.udp);
        assert_eq!(cfg.mark, 255);
        assert_eq!(cfg.timeouts.connect, Duration::from_secs(10));
        assert_eq!(cfg.timeouts.tcp_idle, Duration::from_secs(300));
        assert_eq!(cfg.timeouts.udp_idle, Duration::from_secs(60));
        assert_eq!(
            cfg.outbound,
            OutboundConfig::Socks5 {
                server: "203.0.113.2:1080".parse().unwrap(),
                auth: None
            }
        );
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../examples/tproxyd.toml");
        let env = |k: &str| (k == "TPROXYD_PASSWORD").then(|| "pw".to_string());
        let cfg = RawConfig::from_toml(text, "example")
            .unwrap()
            .validate(&env)
            .unwrap();
        assert_eq!(cfg.mode, Mode::Tproxy);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let issues = issues_of(
            "listen = \"nonsense\"\nmode = \"redirect\"\nudp = true\nmark = 0\n\
             [outbound]\ntype = \"socks5\"\nserver = \"proxy.example:1080\"\nusername = \"u\"\n\
             [timeouts]\nconnect = 0\n",
        );
        let keys: Vec<_> = issues.iter().map(|i| i.key).collect();
        assert_eq!(
            keys,
            [
                "listen",
                "udp",
                "mark",
                "outbound.server",
                "outbound.password",
                "timeouts.connect"
            ]
        );
        assert!(issues[3].message.contains("not a name") || issues[3].message.contains("name"));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_parse_errors_naming_the_key() {
        let err = RawConfig::from_toml("lisen = \"[::]:1\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = RawConfig::from_toml("[outbound]\ntype = 5\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("type"), "{err}");
        let err = RawConfig::from_toml("mode = \"nat\"\n", "t.toml").unwrap_err();
        assert!(err.to_string().contains("nat"), "{err}");
    }

    #[test]
    fn password_from_environment() {
        let raw = RawConfig::from_toml(
            "[outbound]\ntype=\"socks5\"\nserver=\"[2001:db8::1]:1080\"\nusername=\"u\"\npassword_env=\"PW\"\n",
            "t.toml",
        )
        .unwrap();
        let env = |k: &str| (k == "PW").then(|| "s3cret".to_string());
        let cfg = raw.validate(&env).unwrap();
        let OutboundConfig::Socks5 { auth: Some(c), .. } = cfg.outbound else {
            panic!("expected credentials");
        };
        assert_eq!(c.password, "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
        let issues = match raw.validate(&no_env) {
            Err(ConfigError::Invalid(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].key, "outbound.password_env");
    }

    #[test]
    fn redirect_mode_defaults_to_tcp_only() {
        let cfg = RawConfig::from_toml("mode=\"redirect\"\n[outbound]\ntype=\"direct\"\n", "t")
            .unwrap()
            .validate(&no_env)
            .unwrap();
        assert!(cfg.tcp && !cfg.udp);
    }

    #[test]
    fn missing_or_unknown_outbound_is_reported() {
        assert_eq!(issues_of("")[0].key, "outbound.type");
        assert_eq!(
            issues_of("[outbound]\ntype=\"http\"\n")[0].key,
            "outbound.type"
        );
        assert_eq!(
            issues_of("[outbound]\ntype=\"direct\"\nserver=\"1.2.3.4:1\"\n")[0].key,
            "outbound.server"
        );
        assert_eq!(
            issues_of("tcp=false\nudp=false\n[outbound]\ntype=\"direct\"\n")[0].key,
            "tcp"
        );
    }
}
