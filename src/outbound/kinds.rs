//! The one list of outbound kinds: `kinds!`. Each line names a kind's
//! settings (what its `[[outbounds]] type = ...` entry is checked into)
//! and the [`Outbound`] arm that carries it. From that list this file
//! makes [`RawOutbound`] (what `[[outbounds]]` parses into),
//! [`OutboundKind`] (checked) and their methods, and `outbound/mod.rs`
//! makes [`Outbound`], its delegation, [`UDP_HEADROOM`](super::UDP_HEADROOM) and
//! [`UdpUpstream`](super::UdpUpstream). A kind's own file implements
//! [`Kind`] for its settings, [`Carrier`](super::Carrier) for its client
//! and, if it carries UDP, [`UdpCarrier`](super::UdpCarrier) for its UDP
//! upstream; nothing else outside its file changes but its line here, its
//! page in docs/outbounds/ (see docs/architecture.md#adding-an-outbound).

use std::fmt::Debug;
use std::net::SocketAddr;

use serde::de::{self, DeserializeOwned, Deserializer};
use serde::Deserialize;

use super::group::Member;
use super::url::UrlError;
use super::{block, direct, group, http, shadowsocks, socks5};
use super::{BuildError, Carrier, Context, Outbound};

/// THE list of outbound kinds, one line each:
/// `Variant(settings) => Arm(carrier, tcp stream, udp upstream)`. The variant's
/// lowercase name is the config's `type`; `settings` implements [`Kind`];
/// `Arm` is the [`Outbound`] arm that carries it, with its type where the
/// arm is declared, bare where a kind shares an arm declared above
/// (selector and failover are both a `Group`). A carrier that frames the
/// TCP stream names its stream's type after `tcp` (left out for a kind
/// that hands over a bare socket): it implements
/// [`TcpCarrier`](super::TcpCarrier) and is the same-named arm of
/// [`TcpUpstream`](super::TcpUpstream). A carrier that opens UDP
/// upstreams names their type after `udp`: it implements
/// [`UdpCarrier`](super::UdpCarrier) and is the same-named arm of
/// [`UdpUpstream`](super::UdpUpstream).
///
/// It hands the list, in brackets, to the macro `$then` (followed by
/// `extra` tokens, if given): `kinds!(then)` or `kinds!(then; extra)`.
macro_rules! kinds {
    ($then:ident $(; $($extra:tt)*)?) => { $then! { [
        Direct(direct::Settings) => Direct(direct::Direct, udp direct::DirectUdp),
        Socks5(socks5::Settings) => Socks5(socks5::Socks5Client, udp socks5::UdpAssociation),
        Http(http::Settings) => Http(http::HttpClient),
        Shadowsocks(shadowsocks::Settings) => Shadowsocks(shadowsocks::Client, tcp shadowsocks::Stream, udp shadowsocks::udp::ShadowsocksUdp),
        Block(block::Settings) => Block(block::Block),
        Selector(group::SelectorSettings) => Group(group::Group),
        Failover(group::FailoverSettings) => Group,
    ] $($($extra)*)? } };
}
pub(crate) use kinds;

/// What a kind's checked settings are and do; [`OutboundKind`] delegates
/// to it. Implemented in the kind's own file.
pub trait Kind: Sized + Debug + Clone + Eq {
    /// The `[[outbounds]]` entry as written: `#[serde(deny_unknown_fields)]`,
    /// with a `name: Option<String>` field.
    type Raw: DeserializeOwned + Debug + Clone;

    /// What [`build`](Kind::build) makes: the type of its [`Outbound`] arm.
    type Built: Carrier;

    /// The config's `type`: the lowercase name of its line in `kinds!`.
    const TYPE: &'static str;

    /// The URL schemes that name this kind (`tproxyd run --upstream
    /// socks5://…`), lowercase; none: it has no URL form.
    const SCHEMES: &'static [&'static str] = &[];

    /// The settings as written (what its `[[outbounds]]` entry would
    /// hold) from a URL whose scheme is one of [`SCHEMES`](Kind::SCHEMES):
    /// only the reading is done here, [`validate`](Kind::validate) checks
    /// them as it checks a file's. The pieces are in [`super::url`]; an
    /// error never quotes the URL (it may hold a password).
    fn raw_from_url(url: &str) -> Result<Self::Raw, UrlError> {
        let _ = url;
        Err(UrlError::NoUrlForm { kind: Self::TYPE })
    }

    /// The settings (`key` names the outbound in messages); problems go to
    /// `issue`. Member names are the config's to check: it knows every
    /// outbound.
    fn validate(
        raw: &Self::Raw,
        key: &str,
        env: &dyn Fn(&str) -> Option<String>,
        issue: &mut dyn FnMut(&str, String),
    ) -> Self;

    /// The upstream proxy server, for the outbounds that have one: it is
    /// never captured, whatever the rules say.
    fn server(&self) -> Option<SocketAddr> {
        None
    }

    /// The outbounds a group names instead of carrying flows itself.
    fn members(&self) -> &[String] {
        &[]
    }

    /// What the start-up log says of it, without secrets.
    fn describe(&self) -> String {
        Self::TYPE.to_string()
    }

    /// The outbound named `name`; `members` are a group's members, built,
    /// in the order [`members`](Kind::members) names them.
    fn build(
        &self,
        name: &str,
        ctx: &Context,
        members: Vec<Member>,
    ) -> Result<Self::Built, BuildError>;
}

/// What the log says after a proxy's address when it logs in.
pub fn login_note(auth: bool) -> &'static str {
    if auth {
        " (username/password)"
    } else {
        ""
    }
}

/// Makes the config side of `kinds!`: the enums and their delegation.
macro_rules! config_side {
    ([$($kind:ident($settings:ty) => $arm:ident $(($carrier:ty $(, tcp $tcp:ty)? $(, udp $udp:ty)?))?),* $(,)?]) => {
        /// One outbound as written, by `type`.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(tag = "type", rename_all = "lowercase")]
        pub enum RawOutbound {
            $($kind(<$settings as Kind>::Raw),)*
        }

        /// One outbound's settings, checked.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum OutboundKind {
            $($kind($settings),)*
        }

        /// Every kind's URL schemes, in the order of the list.
        const SCHEMES: &[&[&str]] = &[$(<$settings as Kind>::SCHEMES,)*];

        /// Every line's variant and [`Kind::TYPE`], for the test that
        /// serde's tag and the logs agree.
        #[cfg(test)]
        const TYPES: &[(&str, &str)] = &[$((stringify!($kind), <$settings as Kind>::TYPE),)*];

        impl RawOutbound {
            /// The `name` it was given, if any.
            pub fn name(&self) -> Option<&str> {
                match self {
                    $(RawOutbound::$kind(r) => r.name.as_deref(),)*
                }
            }

            pub fn type_name(&self) -> &'static str {
                match self {
                    $(RawOutbound::$kind(_) => <$settings as Kind>::TYPE,)*
                }
            }

            /// The outbound a URL describes (`socks5://user:pass@IP:PORT`),
            /// by its scheme ([`Kind::SCHEMES`]), as written: checked by
            /// [`validate`](Self::validate) like a file's.
            pub fn from_url(url: &str) -> Result<RawOutbound, UrlError> {
                let known = || url_schemes_known();
                let Some(scheme) = super::url::scheme(url.trim()) else {
                    return Err(UrlError::NoScheme { known: known() });
                };
                $(if <$settings as Kind>::SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
                    return Ok(RawOutbound::$kind(<$settings as Kind>::raw_from_url(url)?));
                })*
                Err(UrlError::UnknownScheme {
                    scheme: scheme.to_string(),
                    known: known(),
                })
            }

            /// The outbound with its name (`key` names it in messages);
            /// problems go to `issue`. Member names are the caller's to
            /// check: it knows every outbound.
            pub fn validate(
                &self,
                key: &str,
                name: String,
                env: &dyn Fn(&str) -> Option<String>,
                issue: &mut dyn FnMut(&str, String),
            ) -> OutboundConfig {
                let kind = match self {
                    $(RawOutbound::$kind(r) => {
                        OutboundKind::$kind(<$settings as Kind>::validate(r, key, env, issue))
                    })*
                };
                OutboundConfig { name, kind }
            }
        }

        impl OutboundKind {
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(OutboundKind::$kind(_) => <$settings as Kind>::TYPE,)*
                }
            }

            /// The upstream proxy server, for the outbounds that have one:
            /// it is never captured, whatever the rules say.
            pub fn server(&self) -> Option<SocketAddr> {
                match self {
                    $(OutboundKind::$kind(s) => s.server(),)*
                }
            }

            /// Groups name other outbounds instead of carrying flows
            /// themselves.
            pub fn members(&self) -> &[String] {
                match self {
                    $(OutboundKind::$kind(s) => s.members(),)*
                }
            }

            /// What the start-up log says of it: `socks5 203.0.113.2:1080`,
            /// `failover(a, b)`.
            pub fn describe(&self) -> String {
                match self {
                    $(OutboundKind::$kind(s) => s.describe(),)*
                }
            }

            /// The outbound these settings describe, named `name`.
            /// `members` are a group's members, built, in the order
            /// [`members`](Self::members) names them; empty for the other
            /// kinds.
            pub fn build(
                &self,
                name: &str,
                ctx: &Context,
                members: Vec<Member>,
            ) -> Result<Outbound, BuildError> {
                Ok(match self {
                    $(OutboundKind::$kind(s) => Outbound::$arm(s.build(name, ctx, members)?),)*
                })
            }
        }
    };
}
kinds!(config_side);

/// Every scheme [`RawOutbound::from_url`] reads, for messages:
/// `socks5://, http://`.
pub fn url_schemes_known() -> String {
    let all: Vec<String> = SCHEMES
        .iter()
        .flat_map(|kind| kind.iter())
        .map(|scheme| format!("{scheme}://"))
        .collect();
    all.join(", ")
}

/// One named outbound: where flows that a rule (or `route.final`) sends
/// to it go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundConfig {
    pub name: String,
    pub kind: OutboundKind,
}

impl OutboundKind {
    /// Whether flows sent to it go straight to their destination, as if
    /// never captured (so the kernel may skip capturing them at all).
    pub fn is_direct(&self) -> bool {
        matches!(self, OutboundKind::Direct(_))
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
            (
                "type = \"shadowsocks\"\nserver = \"203.0.113.2:8388\"\nmethod = \"aes-128-gcm\"\npassword = \"x\"",
                "shadowsocks",
                "Shadowsocks",
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
    fn every_kinds_type_is_its_lowercase_variant() {
        for (variant, type_name) in TYPES {
            assert_eq!(variant.to_lowercase(), *type_name);
        }
    }

    /// The checklist in docs/architecture.md ("Adding an outbound"): a
    /// kind has its page, and the table of kinds links it.
    #[test]
    fn every_kind_has_its_docs_page_and_its_row() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let table = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
        for (_, type_name) in TYPES {
            let page = format!("outbounds/{type_name}.md");
            assert!(root.join("docs").join(&page).is_file(), "docs/{page}");
            let row = format!("| `{type_name}` | [{page}]({page}) |");
            assert!(table.contains(&row), "docs/configuration.md lacks {row}");
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

    /// A URL, then `validate`, as `--upstream` does.
    fn from_url(url: &str) -> Result<(OutboundKind, Vec<(String, String)>), UrlError> {
        let raw = RawOutbound::from_url(url)?;
        let mut issues = Vec::new();
        let cfg = raw.validate("outbound", "o".into(), &|_| None, &mut |k, m| {
            issues.push((k.to_string(), m))
        });
        Ok((cfg.kind, issues))
    }

    #[test]
    fn socks5_and_http_urls_give_their_settings() {
        let (kind, issues) =
            from_url("socks5://al%40ice:p%40ss%3Aw%25rd@203.0.113.2:1080").unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        let want = socks5::Settings {
            server: "203.0.113.2:1080".parse().unwrap(),
            auth: Some(super::super::Credentials {
                username: "al@ice".into(),
                password: "p@ss:w%rd".into(),
            }),
            send_domain: false,
            dns_over_tcp: false,
        };
        assert_eq!(kind, OutboundKind::Socks5(want));

        let (kind, _) = from_url("SOCKS5H://[2001:db8::2]:1080/").unwrap();
        let OutboundKind::Socks5(s) = kind else {
            panic!("{kind:?}")
        };
        assert!(s.send_domain && s.auth.is_none());
        assert_eq!(s.server, "[2001:db8::2]:1080".parse().unwrap());

        let (kind, issues) = from_url("http://bob:s%20cret@203.0.113.3:3128#office").unwrap();
        assert!(issues.is_empty(), "{issues:?}");
        let want = http::Settings {
            server: "203.0.113.3:3128".parse().unwrap(),
            auth: Some(super::super::Credentials {
                username: "bob".into(),
                password: "s cret".into(),
            }),
            send_domain: false,
        };
        assert_eq!(kind, OutboundKind::Http(want));
        let raw = RawOutbound::from_url("http://203.0.113.3:3128#office").unwrap();
        assert_eq!(raw.name(), Some("office"));
    }

    /// Reading is the URL's part, checking stays `validate`'s: a user
    /// without a password is the same issue as in a file.
    #[test]
    fn a_url_is_checked_by_validate_like_a_file() {
        let (_, issues) = from_url("socks5://alice@203.0.113.2:1080").unwrap();
        assert_eq!(
            issues,
            vec![(
                "outbound.password".to_string(),
                "username is set but no password".to_string()
            )]
        );
        let (_, issues) = from_url("http://alice:@203.0.113.2:1080").unwrap();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].0, "outbound.password");
    }

    #[test]
    fn an_unknown_scheme_names_the_known_ones() {
        let e = RawOutbound::from_url("ftp://203.0.113.2:21").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown URL scheme \"ftp\": the schemes tproxyd reads are \
             socks5://, socks5h://, http://, ss://"
        );
        let e = RawOutbound::from_url("203.0.113.2:1080").unwrap_err();
        assert!(
            e.to_string()
                .contains("one of socks5://, socks5h://, http://"),
            "{e}"
        );
        let e = RawOutbound::from_url("direct://").unwrap_err();
        assert!(matches!(e, UrlError::UnknownScheme { .. }), "{e}");
        assert_eq!(
            direct::Settings::raw_from_url("direct://").unwrap_err(),
            UrlError::NoUrlForm { kind: "direct" }
        );
    }

    #[test]
    fn url_schemes_are_lowercase_and_name_one_kind_each() {
        let all: Vec<&str> = SCHEMES.iter().flat_map(|s| s.iter().copied()).collect();
        for (i, scheme) in all.iter().enumerate() {
            assert_eq!(scheme.to_ascii_lowercase(), *scheme);
            assert!(super::super::url::scheme(&format!("{scheme}://")).is_some());
            assert!(!all[i + 1..].contains(scheme), "{scheme} twice");
        }
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
