//! `[api]`: the Clash-compatible API, `/metrics` and the dashboard listener.

use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

use super::de;

/// `[api]`: one listener for the Clash-compatible API, `/metrics` and
/// the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// The Bearer token every request must carry; None: no auth (allowed
    /// on a loopback address only).
    pub secret: Option<Secret>,
}

/// A token that must never reach a log line or a debug dump.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for comparing a request's token against it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where the API listens when `[api]` is present without `listen`:
/// loopback, so nothing outside the box reaches it unless asked for.
pub const DEFAULT_API_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    #[serde(default, deserialize_with = "de::opt_socket_addr")]
    pub listen: Option<SocketAddr>,
    pub secret: Option<String>,
}

/// `[api]`: a listener anyone else can reach must ask for a token, since
/// the API closes flows, switches upstreams and reloads the rules.
pub(super) fn validate_api(raw: &RawApi, issue: &mut dyn FnMut(&str, String)) -> ApiConfig {
    let listen = raw.listen.unwrap_or(DEFAULT_API_LISTEN);
    // An empty secret is no secret (as in mihomo): no auth at all.
    let secret = raw
        .secret
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(Secret::new);
    if secret.is_none() && !listen.ip().is_loopback() {
        issue(
            "api.secret",
            format!(
                "is required when api.listen ({listen}) is not a loopback address: whoever \
                 reaches it could close flows, switch upstreams and reload the rules. Set \
                 api.secret = \"<a long random string>\" (dashboards send it as the Bearer \
                 token), or listen on loopback (api.listen = \"127.0.0.1:{}\")",
                listen.port()
            ),
        );
    }
    if raw
        .secret
        .as_deref()
        .is_some_and(|s| s.chars().any(char::is_control))
    {
        issue(
            "api.secret",
            "must not contain control characters: an HTTP header cannot carry them".into(),
        );
    }
    ApiConfig { listen, secret }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    #[test]
    fn api_listens_on_loopback_by_default_and_elsewhere_only_with_a_secret() {
        let base = "[outbound]\ntype = \"direct\"\n[firewall]\nbackend = \"none\"\n";
        let cfg = RawConfig::from_toml(&format!("{base}[api]\n"), "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap();
        let api = cfg.api.expect("[api] present");
        assert_eq!(api.listen, DEFAULT_API_LISTEN);
        assert_eq!(api.secret, None);
        let none = RawConfig::from_toml(base, "t")
            .unwrap()
            .validate(&|_| None)
            .unwrap();
        assert!(none.api.is_none());

        for listen in ["0.0.0.0:9090", "[::]:9090", "192.0.2.1:9090"] {
            for secret in ["", "secret = \"\"\n"] {
                let text = format!("{base}[api]\nlisten = \"{listen}\"\n{secret}");
                let err = RawConfig::from_toml(&text, "t")
                    .unwrap()
                    .validate(&|_| None)
                    .unwrap_err();
                let ConfigError::Invalid(issues) = err else {
                    panic!("{err}")
                };
                assert_eq!(issues.len(), 1, "{issues:?}");
                assert_eq!(issues[0].key, "api.secret");
                assert!(issues[0].message.contains("not a loopback address"));
                assert!(issues[0].message.contains("127.0.0.1:9090"));
            }
            let text = format!("{base}[api]\nlisten = \"{listen}\"\nsecret = \"s3cr3t-value\"\n");
            let cfg = RawConfig::from_toml(&text, "t")
                .unwrap()
                .validate(&|_| None)
                .unwrap();
            let api = cfg.api.as_ref().unwrap();
            assert_eq!(
                api.secret.as_ref().map(Secret::expose),
                Some("s3cr3t-value")
            );
            // Never in a debug dump of the config.
            assert!(!format!("{cfg:?}").contains("s3cr3t"));
        }
        let err = RawConfig::from_toml(&format!("{base}[api]\nport = 1\n"), "t").unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
    }
}
