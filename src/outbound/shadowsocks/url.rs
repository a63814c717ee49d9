//! `ss://` URLs (SIP002): `ss://USERINFO@IP:PORT[/][?plugin=…][#tag]`,
//! USERINFO being base64url of `method:password` (AEAD; padded or not)
//! or `method:password` percent-encoded (2022, where base64 is not
//! allowed), and the legacy `ss://BASE64(method:password@IP:PORT)#tag`.
//! No message here ever quotes the URL: it holds the password.

use std::fmt;
use std::net::SocketAddr;

use base64::Engine;
use percent_encoding::percent_decode_str;

/// The port SIP002 and shadowsocks-rust assume when none is written.
pub const DEFAULT_PORT: u16 = 8388;

/// An `ss://` URL, read.
#[derive(Clone, PartialEq, Eq)]
pub struct SsUrl {
    pub server: SocketAddr,
    /// As written (checked by the settings' validation).
    pub method: String,
    pub password: String,
    /// The `#tag`, percent-decoded.
    pub tag: Option<String>,
}

impl fmt::Debug for SsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SsUrl")
            .field("server", &self.server)
            .field("method", &self.method)
            .field("password", &"<redacted>")
            .field("tag", &self.tag)
            .finish()
    }
}

/// Why a URL is no `ss://` URL tproxyd can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SsUrlError {
    #[error("not an ss:// URL")]
    NotSs,
    #[error(
        "the user part is neither base64url of METHOD:PASSWORD (AEAD methods) nor \
         percent-encoded METHOD:PASSWORD (2022 methods)"
    )]
    UserInfo,
    #[error("no METHOD:PASSWORD@ before the server")]
    NoUserInfo,
    #[error(
        "the server must be an IP address with an optional port (IP, IP:PORT, [IPv6]:PORT): \
         tproxyd does not resolve proxy names, as the DNS it would ask may be the one it captures"
    )]
    Server,
    #[error(
        "SIP003 plugins (plugin=…) are not supported: tproxyd talks to the shadowsocks server \
         directly; use a server port without a plugin"
    )]
    Plugin,
    #[error("percent-encoding in the URL is not valid UTF-8")]
    Encoding,
}

/// Reads an `ss://` URL.
pub fn parse(url: &str) -> Result<SsUrl, SsUrlError> {
    let url = url.trim();
    let rest = url
        .get(..5)
        .filter(|s| s.eq_ignore_ascii_case("ss://"))
        .map(|_| &url[5..])
        .ok_or(SsUrlError::NotSs)?;
    let (rest, tag) = match rest.split_once('#') {
        Some((rest, tag)) => (rest, Some(decode(tag)?)),
        None => (rest, None),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    if let Some(query) = query {
        for pair in query.split('&') {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            if key.eq_ignore_ascii_case("plugin") {
                return Err(SsUrlError::Plugin);
            }
            // Unknown keys are ignored, as SIP002 says.
        }
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let tag = tag.filter(|t| !t.is_empty());
    let (userinfo, host) = match rest.rsplit_once('@') {
        Some(split) => split,
        None => {
            // Legacy: the whole method:password@host:port in base64.
            let plain = base64_any(rest).ok_or(SsUrlError::NoUserInfo)?;
            let plain = String::from_utf8(plain).map_err(|_| SsUrlError::UserInfo)?;
            let (user, host) = plain.rsplit_once('@').ok_or(SsUrlError::NoUserInfo)?;
            let (method, password) = user.split_once(':').ok_or(SsUrlError::UserInfo)?;
            return Ok(SsUrl {
                server: server(host)?,
                method: method.to_string(),
                password: password.to_string(),
                tag,
            });
        }
    };
    let (method, password) = match userinfo.split_once(':') {
        // Percent-encoded method:password (2022; also accepted for AEAD).
        Some((method, password)) => (decode(method)?, decode(password)?),
        None => {
            let plain = base64_any(&decode(userinfo)?).ok_or(SsUrlError::UserInfo)?;
            let plain = String::from_utf8(plain).map_err(|_| SsUrlError::UserInfo)?;
            let (method, password) = plain.split_once(':').ok_or(SsUrlError::UserInfo)?;
            (method.to_string(), password.to_string())
        }
    };
    if method.is_empty() || password.is_empty() {
        return Err(SsUrlError::UserInfo);
    }
    Ok(SsUrl {
        server: server(host)?,
        method,
        password,
        tag,
    })
}

fn decode(text: &str) -> Result<String, SsUrlError> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| SsUrlError::Encoding)
}

/// Base64 in either alphabet, padded or not (SIP002 says base64url;
/// clients write all four).
fn base64_any(text: &str) -> Option<Vec<u8>> {
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    let config = general_purpose::GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let url = GeneralPurpose::new(&base64::alphabet::URL_SAFE, config);
    let std = GeneralPurpose::new(&base64::alphabet::STANDARD, config);
    url.decode(text).or_else(|_| std.decode(text)).ok()
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`; the port defaults to 8388.
fn server(host: &str) -> Result<SocketAddr, SsUrlError> {
    if let Ok(a) = host.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
        .map_err(|_| SsUrlError::Server)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SIP002's own examples.
    #[test]
    fn the_spec_examples() {
        let u = parse("ss://YWVzLTEyOC1nY206dGVzdA@192.168.100.1:8888#Example1").unwrap();
        assert_eq!(u.method, "aes-128-gcm");
        assert_eq!(u.password, "test");
        assert_eq!(u.server, "192.168.100.1:8888".parse().unwrap());
        assert_eq!(u.tag.as_deref(), Some("Example1"));
        let u = parse(
            "ss://2022-blake3-aes-256-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtRizJN9K8y%2BuKlW2qjlI%3D@192.168.100.1:8888#Example3",
        )
        .unwrap();
        assert_eq!(u.method, "2022-blake3-aes-256-gcm");
        assert_eq!(u.password, "YctPZ6U7xPPcU+gp3u+0tx/tRizJN9K8y+uKlW2qjlI=");
        assert_eq!(u.tag.as_deref(), Some("Example3"));
    }

    #[test]
    fn padding_ports_ipv6_tags_and_the_legacy_form() {
        // base64url with padding, and %3D padding; trailing slash; no port.
        for url in [
            "ss://YWVzLTEyOC1nY206dGVzdA==@192.168.100.1/",
            "ss://YWVzLTEyOC1nY206dGVzdA%3D%3D@192.168.100.1",
        ] {
            let u = parse(url).unwrap();
            assert_eq!(
                (u.method.as_str(), u.password.as_str()),
                ("aes-128-gcm", "test")
            );
            assert_eq!(u.server.port(), DEFAULT_PORT);
        }
        let u =
            parse("ss://YWVzLTEyOC1nY206dGVzdA@[2001:db8::1]:443/?foo=bar#My%20Server").unwrap();
        assert_eq!(u.server, "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(u.tag.as_deref(), Some("My Server"));
        // ss://BASE64(aes-128-gcm:test@192.168.100.1:8888)#tag
        let legacy =
            base64::engine::general_purpose::STANDARD.encode("aes-128-gcm:test@192.168.100.1:8888");
        let u = parse(&format!("ss://{legacy}#old")).unwrap();
        assert_eq!(u.password, "test");
        assert_eq!(u.server.port(), 8888);
        // A password with ':' and '@' in it survives both forms.
        let u = parse("ss://YWVzLTEyOC1nY206YTpiQGM@10.0.0.1:1").unwrap();
        assert_eq!(u.password, "a:b@c");
    }

    #[test]
    fn refusals_are_clear_and_never_quote_the_url() {
        let secret = "hunter2";
        let cases = [
            ("http://x", SsUrlError::NotSs),
            (
                "ss://YWVzLTEyOC1nY206aHVudGVyMg@proxy.example:8388",
                SsUrlError::Server,
            ),
            (
                "ss://YWVzLTEyOC1nY206aHVudGVyMg@10.0.0.1:8388/?plugin=obfs-local%3Bobfs%3Dhttp",
                SsUrlError::Plugin,
            ),
            ("ss://!!!@10.0.0.1:8388", SsUrlError::UserInfo),
            ("ss://aes-128-gcm:@10.0.0.1:8388", SsUrlError::UserInfo),
        ];
        for (url, want) in cases {
            let e = parse(url).unwrap_err();
            assert_eq!(e, want, "{url}");
            assert!(!e.to_string().contains(secret));
        }
        let u = parse("ss://aes-128-gcm:hunter2@10.0.0.1:8388").unwrap();
        assert!(!format!("{u:?}").contains(secret));
    }
}
