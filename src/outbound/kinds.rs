//! The one list of outbound kinds: what `[[outbounds]] type = ...`
//! accepts, how each entry is checked, and what it builds. Adding a kind
//! adds one line to each `match` here and nothing elsewhere outside its
//! own file (see docs/architecture-outbounds.md).

use std::net::SocketAddr;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::block::{self, Block};
use super::direct::{self, Direct};
use super::group::{self, Member};
use super::http::{self, HttpClient};
use super::socks5::{self, Socks5Client};
use super::{BuildError, Context, Outbound};

/// One outbound as written, by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RawOutbound {
    Direct(direct::Raw),
    Socks5(socks5::Raw),
    Http(http::Raw),
    Block(block::Raw),
    Selector(group::RawSelector),
    Failover(group::RawFailover),
}

/// One outbound's settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundKind {
    Direct,
    Socks5(socks5::Settings),
    Http(http::Settings),
    Block,
    Selector(group::SelectorSettings),
    Failover(group::FailoverSettings),
}

/// One named outbound: where flows that a rule (or `route.final`) sends
/// to it go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundConfig {
    pub name: String,
    pub kind: OutboundKind,
}

impl RawOutbound {
    /// The `name` it was given, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            RawOutbound::Direct(r) => r.name.as_deref(),
            RawOutbound::Socks5(r) => r.name.as_deref(),
            RawOutbound::Http(r) => r.name.as_deref(),
            RawOutbound::Block(r) => r.name.as_deref(),
            RawOutbound::Selector(r) => r.name.as_deref(),
            RawOutbound::Failover(r) => r.name.as_deref(),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            RawOutbound::Direct(_) => "direct",
            RawOutbound::Socks5(_) => "socks5",
            RawOutbound::Http(_) => "http",
            RawOutbound::Block(_) => "block",
            RawOutbound::Selector(_) => "selector",
            RawOutbound::Failover(_) => "failover",
        }
    }

    /// The outbound with its name (`key` names it in messages); problems
    /// go to `issue`. Member names are the caller's to check: it knows
    /// every outbound.
    pub fn validate(
        &self,
        key: &str,
        name: String,
        env: &dyn Fn(&str) -> Option<String>,
        issue: &mut dyn FnMut(&str, String),
    ) -> OutboundConfig {
        let kind = match self {
            RawOutbound::Direct(_) => OutboundKind::Direct,
            RawOutbound::Socks5(r) => OutboundKind::Socks5(r.validate(key, env, issue)),
            RawOutbound::Http(r) => OutboundKind::Http(r.validate(key, env, issue)),
            RawOutbound::Block(_) => OutboundKind::Block,
            RawOutbound::Selector(r) => OutboundKind::Selector(r.validate(key, issue)),
            RawOutbound::Failover(r) => OutboundKind::Failover(r.validate(key, issue)),
        };
        OutboundConfig { name, kind }
    }
}

impl OutboundKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            OutboundKind::Direct => "direct",
            OutboundKind::Socks5(_) => "socks5",
            OutboundKind::Http(_) => "http",
            OutboundKind::Block => "block",
            OutboundKind::Selector(_) => "selector",
            OutboundKind::Failover(_) => "failover",
        }
    }

    /// Whether flows sent to it go straight to their destination, as if
    /// never captured (so the kernel may skip capturing them at all).
    pub fn is_direct(&self) -> bool {
        *self == OutboundKind::Direct
    }

    /// The upstream proxy server, for the outbounds that have one: it is
    /// never captured, whatever the rules say.
    pub fn server(&self) -> Option<SocketAddr> {
        match self {
            OutboundKind::Socks5(s) => Some(s.server),
            OutboundKind::Http(s) => Some(s.server),
            _ => None,
        }
    }

    /// Groups name other outbounds instead of carrying flows themselves.
    pub fn members(&self) -> &[String] {
        match self {
            OutboundKind::Selector(s) => &s.members,
            OutboundKind::Failover(s) => &s.members,
            _ => &[],
        }
    }

    /// What the start-up log says of it: `socks5 203.0.113.2:1080`,
    /// `failover(a, b)`.
    pub fn describe(&self) -> String {
        let login = |auth: bool| if auth { " (username/password)" } else { "" };
        let kind = self.type_name();
        match self {
            OutboundKind::Socks5(s) => format!("{kind} {}{}", s.server, login(s.auth.is_some())),
            OutboundKind::Http(s) => format!("{kind} {}{}", s.server, login(s.auth.is_some())),
            OutboundKind::Selector(_) | OutboundKind::Failover(_) => {
                format!("{kind}({})", self.members().join(", "))
            }
            OutboundKind::Direct | OutboundKind::Block => kind.to_string(),
        }
    }

    /// The outbound these settings describe, named `name`. `members` are
    /// a group's members, built, in the order [`members`](Self::members)
    /// names them; empty for the other kinds.
    pub fn build(
        &self,
        name: &str,
        ctx: &Context,
        members: Vec<Member>,
    ) -> Result<Outbound, BuildError> {
        Ok(match self {
            OutboundKind::Direct => Outbound::Direct(Direct::new(ctx)),
            OutboundKind::Socks5(s) => Outbound::Socks5(Socks5Client::new(s, ctx)),
            OutboundKind::Http(s) => Outbound::Http(HttpClient::from_settings(s, ctx)),
            OutboundKind::Block => Outbound::Block(Block),
            OutboundKind::Selector(s) => Outbound::Group(s.build(name, members)?),
            OutboundKind::Failover(s) => Outbound::Group(s.build(name, members)?),
        })
    }
}

/// An outbound's `server`: `IP:PORT`. The outbounds are read through a
/// tagged enum, which loses the key's position, so the message names the
/// key itself.
pub fn server<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    crate::addr::parse_ip_port(&text).map_err(|e| de::Error::custom(format!("server: {e}")))
}

/// An outbound's `dns_over_tcp`: named in the message for the same reason
/// as [`server`].
pub fn dns_over_tcp<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    bool::deserialize(d).map_err(|e| de::Error::custom(format!("dns_over_tcp: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RawOutbound, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn every_kind_parses_by_its_type_and_builds() {
        let ctx = Context {
            mark: 1,
            connect_timeout: std::time::Duration::from_secs(1),
        };
        for (text, kind, clash) in [
            ("type = \"direct\"", "direct", "Direct"),
            ("type = \"block\"", "block", "Reject"),
            (
                "type = \"socks5\"\nserver = \"203.0.113.2:1080\"",
                "socks5",
                "Socks5",
            ),
            (
                "type = \"http\"\nserver = \"203.0.113.2:3128\"",
                "http",
                "Http",
            ),
        ] {
            let raw = parse(text).unwrap();
            assert_eq!(raw.type_name(), kind);
            let mut issues = Vec::new();
            let cfg = raw.validate("outbound", "o".into(), &|_| None, &mut |k, m| {
                issues.push((k.to_string(), m))
            });
            assert!(issues.is_empty(), "{issues:?}");
            assert_eq!(cfg.kind.type_name(), kind);
            let built = cfg.kind.build("o", &ctx, Vec::new()).unwrap();
            assert_eq!(built.name(), kind);
            assert_eq!(built.clash_type(), clash);
        }
    }

    #[test]
    fn unknown_types_and_keys_are_refused() {
        assert!(parse("type = \"carrier-pigeon\"").is_err());
        let e = parse("type = \"direct\"\nserver = \"203.0.113.2:1\"").unwrap_err();
        assert!(e.contains("unknown field `server`"), "{e}");
        let e = parse("type = \"socks5\"\nserver = \"proxy.example:1080\"").unwrap_err();
        assert!(
            e.contains("server: \"proxy.example:1080\" is not IP:PORT"),
            "{e}"
        );
    }

    #[test]
    fn the_log_describes_each_kind_without_secrets() {
        let raw = parse(
            "type = \"socks5\"\nserver = \"203.0.113.2:1080\"\nusername = \"u\"\npassword = \"secret\"",
        )
        .unwrap();
        let cfg = raw.validate("outbound", "p".into(), &|_| None, &mut |_, _| {});
        assert_eq!(
            cfg.kind.describe(),
            "socks5 203.0.113.2:1080 (username/password)"
        );
        let raw = parse("type = \"failover\"\noutbounds = [\"a\", \"b\"]").unwrap();
        let cfg = raw.validate("outbound", "f".into(), &|_| None, &mut |_, _| {});
        assert_eq!(cfg.kind.describe(), "failover(a, b)");
    }
}
