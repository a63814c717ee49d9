//! The names the fake-ip pool (`dns::fakeip`) leaves to the real
//! resolvers, compiled here with the route's matcher over the rule sets
//! the policy reads once.

use std::net::Ipv4Addr;

use super::rule_set::RuleSet;
use super::rules::Rules;
use super::{FlowMeta, PolicyError};
use crate::config::{FakeIp, Network, RouteConfig, Rule};

/// Names that get real addresses when `default_exclude` is on (the
/// default), each for a reason users met (docs/dns.md, Fake-ip):
/// - LAN names: they resolve to local hosts that tproxyd must not proxy;
/// - NTP: a clock that cannot sync breaks TLS and shadowsocks 2022;
/// - captive-portal and connectivity checks: Windows NCSI, Android, Apple
///   and GNOME compare the answer with a known address, and a fake one
///   shows "no Internet";
/// - game consoles (Xbox Live, PlayStation Network, Nintendo): their NAT
///   type tests and stores fail through fake addresses.
pub const DEFAULT_EXCLUDE_SUFFIXES: &[&str] = &[
    // LAN
    "lan",
    "local",
    "localhost",
    "localdomain",
    "home.arpa",
    "internal",
    // NTP
    "ntp.org",
    "time.windows.com",
    "time.apple.com",
    "time.google.com",
    "time.cloudflare.com",
    // Captive portals, connectivity checks
    "msftconnecttest.com",
    "msftncsi.com",
    "connectivitycheck.gstatic.com",
    "connectivitycheck.android.com",
    "clients3.google.com",
    "captive.apple.com",
    "detectportal.firefox.com",
    "nmcheck.gnome.org",
    "connectivity-check.ubuntu.com",
    // Consoles
    "xboxlive.com",
    "playstation.net",
    "playstation.com",
    "nintendo.net",
];

/// STUN servers (`stun.l.google.com`, `stun1.example`): a peer-to-peer
/// call finds its public address through them, which a fake address hides.
pub const DEFAULT_EXCLUDE_REGEXES: &[&str] = &[r"^stun[0-9]*\."];

/// The names the pool leaves to the real resolver: the configured
/// `exclude_domain`, `exclude_domain_suffix` and `exclude_rule_set`
/// (rule sets read once, by the policy, with the route's), and the
/// built-in list when `default_exclude`. Matched by the route's matcher.
#[derive(Debug, Default)]
pub struct Exclusions {
    rules: Option<Rules>,
}

impl Exclusions {
    /// From `fake`'s keys; `sets[i]` is the contents of
    /// `route.rule_sets[i]` (as the policy read them).
    pub fn build(
        fake: &FakeIp,
        route: &RouteConfig,
        sets: &[RuleSet],
    ) -> Result<Exclusions, PolicyError> {
        let mut rule = Rule {
            domain: fake.exclude_domain.clone(),
            domain_suffix: fake.exclude_domain_suffix.clone(),
            rule_set: fake.exclude_rule_set.clone(),
            ..Rule::default()
        };
        if fake.default_exclude {
            rule.domain_suffix
                .extend(DEFAULT_EXCLUDE_SUFFIXES.iter().map(|s| s.to_string()));
            rule.domain_regex
                .extend(DEFAULT_EXCLUDE_REGEXES.iter().map(|s| s.to_string()));
        }
        // A rule without keys would match every name.
        if rule.domain.is_empty()
            && rule.domain_suffix.is_empty()
            && rule.domain_regex.is_empty()
            && rule.rule_set.is_empty()
        {
            return Ok(Exclusions::default());
        }
        let only = RouteConfig {
            final_outbound: String::new(),
            rules: vec![rule],
            rule_sets: route.rule_sets.clone(),
        };
        let rules = Rules::with_sets(&only, sets).map_err(|e| PolicyError::FakeIp {
            message: match e {
                PolicyError::Rule { message, .. } => message,
                other => other.to_string(),
            },
        })?;
        Ok(Exclusions { rules: Some(rules) })
    }

    /// Whether `name` (a lowercased host name) gets real addresses.
    pub fn excludes(&self, name: &str) -> bool {
        let Some(rules) = &self.rules else {
            return false;
        };
        let any = std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let meta = FlowMeta {
            domain: Some(name),
            ..FlowMeta::addresses(Network::Udp, any, any)
        };
        rules.first_match(&meta).is_some()
    }
}
