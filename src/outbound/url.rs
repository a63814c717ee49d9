//! Outbounds written as one URL (`socks5://user:pass@203.0.113.2:1080`),
//! for `tproxyd run --upstream URL`: the pieces every kind's
//! [`Kind::raw_from_url`](super::kinds::Kind::raw_from_url) uses, and the
//! one error type. A URL turns into the kind's settings *as written*
//! (its `Raw`), which [`Kind::validate`](super::kinds::Kind::validate)
//! then checks exactly as it checks a config file's.
//!
//! A URL may hold a password: no message here ever quotes the URL or its
//! user part, only which piece is wrong.

use std::net::SocketAddr;

/// Why a URL does not describe an outbound. Never holds the URL's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not an outbound URL: expected one of {known} followed by [USER:PASSWORD@]IP:PORT")]
    NoScheme { known: String },
    #[error("unknown URL scheme {scheme:?}: the schemes tproxyd reads are {known}")]
    UnknownScheme { scheme: String, known: String },
    /// A kind without a URL form was asked for one (not reachable through
    /// [`RawOutbound::from_url`](super::RawOutbound::from_url), which picks
    /// kinds by their schemes).
    #[error("a {kind} outbound has no URL form")]
    NoUrlForm { kind: &'static str },
    #[error("{scheme}:// URL: {problem}")]
    Invalid { scheme: String, problem: String },
}

impl UrlError {
    /// An [`UrlError::Invalid`] for a URL of `scheme`.
    pub fn invalid(scheme: &str, problem: impl Into<String>) -> Self {
        UrlError::Invalid {
            scheme: scheme.to_ascii_lowercase(),
            problem: problem.into(),
        }
    }
}

/// A URL cut into its pieces, nothing decoded:
/// `scheme://[userinfo@]host[/path][?query][#fragment]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts<'a> {
    /// As written; compare it ignoring ASCII case.
    pub scheme: &'a str,
    /// Before the last `@` of the authority, still percent-encoded.
    pub userinfo: Option<&'a str>,
    /// The authority after the user part: `IP:PORT` for every kind.
    pub host: &'a str,
    /// From the first `/` after the authority on (empty when none).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub fragment: Option<&'a str>,
}

/// The scheme of `url`, if it starts with one (`SCHEME://`).
pub fn scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    let valid = first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

/// Cuts `url` into its [`Parts`].
pub fn split(url: &str) -> Result<Parts<'_>, UrlError> {
    let url = url.trim();
    let scheme = scheme(url).ok_or_else(|| UrlError::NoScheme {
        known: super::kinds::url_schemes_known(),
    })?;
    let rest = &url[scheme.len() + "://".len()..];
    let (rest, fragment) = match rest.split_once('#') {
        Some((rest, fragment)) => (rest, Some(fragment)),
        None => (rest, None),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    // The last `@` ends the user part: a host never holds one, while a
    // careless password might, and so might a `/` (standard base64, which
    // some shadowsocks links use where SIP002 says base64url).
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, rest),
    };
    let (host, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    Ok(Parts {
        scheme,
        userinfo,
        host,
        path,
        query,
        fragment,
    })
}

impl Parts<'_> {
    /// The server as `IP:PORT` (`[v6]:port` for IPv6); a host name is
    /// refused, as in the config file.
    pub fn server(&self) -> Result<SocketAddr, UrlError> {
        if self.host.is_empty() {
            return Err(UrlError::invalid(
                self.scheme,
                "no server: write IP:PORT after //",
            ));
        }
        // Not quoted: in a URL whose `@` is missing, the "host" is the
        // user part, password and all.
        crate::addr::parse_ip_port(self.host).map_err(|_| {
            UrlError::invalid(
                self.scheme,
                "the server after // is not IP:PORT (like 203.0.113.2:1080 or \
                 [2001:db8::2]:1080); a host name is refused on purpose: resolving it could go \
                 through the DNS tproxyd itself captures",
            )
        })
    }

    /// Refuses a path other than `/`, and any query: for the kinds that
    /// take neither.
    pub fn no_path_or_query(&self) -> Result<(), UrlError> {
        if !matches!(self.path, "" | "/") {
            return Err(UrlError::invalid(
                self.scheme,
                "a path after IP:PORT means nothing to this kind; remove it",
            ));
        }
        if self.query.is_some() {
            return Err(UrlError::invalid(
                self.scheme,
                "this kind takes no ?options in its URL; use a config file (-c) for them",
            ));
        }
        Ok(())
    }

    /// The username and password of `user:password@`, percent-decoded;
    /// None without a user part. The password is None when there is no
    /// `:`; an empty username or password is left for `validate` to
    /// refuse, with its usual message.
    pub fn credentials(&self) -> Result<Option<(String, Option<String>)>, UrlError> {
        let Some(userinfo) = self.userinfo else {
            return Ok(None);
        };
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        let user =
            percent_decode(user).map_err(|e| UrlError::invalid(self.scheme, e.in_("username")))?;
        let password = password
            .map(percent_decode)
            .transpose()
            .map_err(|e| UrlError::invalid(self.scheme, e.in_("password")))?;
        Ok(Some((user, password)))
    }

    /// The `#name` at the end, percent-decoded.
    pub fn name(&self) -> Result<Option<String>, UrlError> {
        self.fragment
            .filter(|f| !f.is_empty())
            .map(percent_decode)
            .transpose()
            .map_err(|e| UrlError::invalid(self.scheme, e.in_("#name")))
    }
}

/// What is wrong with a percent-encoded piece, without quoting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
}

impl DecodeError {
    /// The message for the piece `what`.
    pub fn in_(self, what: &str) -> String {
        match self {
            DecodeError::BadEscape => {
                format!(
                    "the {what} has a % not followed by two hex digits (write a % itself as %25)"
                )
            }
            DecodeError::NotUtf8 => format!("the {what} is not UTF-8 once percent-decoded"),
        }
    }
}

/// `text` with every `%XX` replaced by its byte (a `+` stays a `+`).
pub fn percent_decode(text: &str) -> Result<String, DecodeError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(DecodeError::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| DecodeError::BadEscape)?;
            if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                return Err(DecodeError::BadEscape);
            }
            let byte = u8::from_str_radix(hex, 16).map_err(|_| DecodeError::BadEscape)?;
            out.push(byte);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_splits_into_its_parts() {
        let p = split("socks5://al%40ice:p%3Aw@[2001:db8::2]:1080/?x=1#my%20proxy").unwrap();
        assert_eq!(
            p,
            Parts {
                scheme: "socks5",
                userinfo: Some("al%40ice:p%3Aw"),
                host: "[2001:db8::2]:1080",
                path: "/",
                query: Some("x=1"),
                fragment: Some("my%20proxy"),
            }
        );
        assert_eq!(
            p.credentials().unwrap(),
            Some(("al@ice".to_string(), Some("p:w".to_string())))
        );
        assert_eq!(p.name().unwrap(), Some("my proxy".to_string()));
        assert_eq!(p.server().unwrap(), "[2001:db8::2]:1080".parse().unwrap());

        let p = split(" HTTP://203.0.113.2:3128 ").unwrap();
        assert_eq!(
            (p.scheme, p.userinfo, p.host),
            ("HTTP", None, "203.0.113.2:3128")
        );
        assert_eq!(p.credentials().unwrap(), None);
        p.no_path_or_query().unwrap();
    }

    #[test]
    fn the_last_at_sign_ends_the_user_part() {
        let p = split("ss://YWVz/LTI1+w==@203.0.113.2:8388/?plugin=x#n").unwrap();
        assert_eq!(p.userinfo, Some("YWVz/LTI1+w=="));
        assert_eq!((p.host, p.path), ("203.0.113.2:8388", "/"));
        let p = split("http://u:p@ss@203.0.113.2:1").unwrap();
        assert_eq!(
            p.credentials().unwrap(),
            Some(("u".to_string(), Some("p@ss".to_string())))
        );
        let p = split("http://u@203.0.113.2:1").unwrap();
        assert_eq!(p.credentials().unwrap(), Some(("u".to_string(), None)));
    }

    #[test]
    fn percent_decoding_takes_every_byte_and_refuses_broken_escapes() {
        assert_eq!(percent_decode("a%20b+c%2b%E2%82%AC").unwrap(), "a b+c+€");
        assert_eq!(percent_decode("100%"), Err(DecodeError::BadEscape));
        assert_eq!(percent_decode("%4"), Err(DecodeError::BadEscape));
        assert_eq!(percent_decode("%zz"), Err(DecodeError::BadEscape));
        assert_eq!(percent_decode("%+1"), Err(DecodeError::BadEscape));
        assert_eq!(percent_decode("%ff"), Err(DecodeError::NotUtf8));
    }

    #[test]
    fn errors_never_quote_the_secret() {
        let secret = "hunter2%zz";
        let url = format!("socks5://alice:{secret}@203.0.113.2:1080");
        let e = split(&url).unwrap().credentials().unwrap_err().to_string();
        assert!(e.contains("password"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        for url in [
            "socks5://alice:hunter2@203.0.113.2",
            "socks5://alice:hunter2",
        ] {
            let e = split(url).unwrap().server().unwrap_err().to_string();
            assert!(e.contains("not IP:PORT"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e = split("alice:hunter2@203.0.113.2:1080").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn paths_queries_and_missing_servers_are_named() {
        let e = split("socks5://203.0.113.2:1080/x")
            .unwrap()
            .no_path_or_query();
        assert!(e.unwrap_err().to_string().contains("a path"));
        let e = split("socks5://203.0.113.2:1080?a=b")
            .unwrap()
            .no_path_or_query();
        assert!(e.unwrap_err().to_string().contains("?options"));
        let e = split("socks5://u:p@").unwrap().server().unwrap_err();
        assert!(e.to_string().contains("no server"), "{e}");
        assert_eq!(scheme("1x://a"), None);
        assert_eq!(scheme("no-scheme"), None);
    }
}
