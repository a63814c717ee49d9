//! The one rule for a host name: what sniffing accepts from a client's
//! bytes (SNI, `Host`, QUIC), what DNS learns, and what an outbound may
//! send upstream in place of an address (SOCKS5 ATYP 3, HTTP CONNECT).
//! One rule for all, so that a name a rule matched is the very name the
//! proxy is asked for, and nothing else ever reaches a request line.

/// Longest host name (RFC 1035, without the trailing dot).
pub const MAX_HOST_LEN: usize = 253;

/// `raw` as a host name: ASCII letters, digits and hyphens in labels of
/// 1 to 63 characters that neither start nor end with a hyphen, at most
/// 253 characters, no trailing dot, and not an IPv4 literal in any of
/// the forms resolvers accept (so the last label is never all digits nor
/// `0x` hex). Returned lowercased. A name that is not valid is no name:
/// rules never see it and it is never sent upstream (Tor's onion names
/// reach here fine, but garbage does not).
pub fn host_name(raw: &[u8]) -> Option<String> {
    if raw.is_empty() || raw.len() > MAX_HOST_LEN {
        return None;
    }
    let mut last = &raw[..0];
    for label in raw.split(|&b| b == b'.') {
        let ldh = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-';
        if label.is_empty()
            || label.len() > 63
            || !label.iter().all(ldh)
            || label[0] == b'-'
            || label[label.len() - 1] == b'-'
        {
            return None;
        }
        last = label;
    }
    let numeric = last.iter().all(u8::is_ascii_digit)
        || (last.len() > 2
            && last[..2].eq_ignore_ascii_case(b"0x")
            && last[2..].iter().all(u8::is_ascii_hexdigit));
    if numeric {
        return None;
    }
    // Every byte is ASCII (checked above), so this cannot fail.
    let name = std::str::from_utf8(raw).ok()?;
    Some(name.to_ascii_lowercase())
}

/// Whether `name` is already a valid, lowercased host name, as
/// [`host_name`] returns them. Every outbound checks a name with this
/// before it sends it upstream (SOCKS5 `send_domain`, HTTP CONNECT): a
/// name from a client's bytes must never smuggle anything else along.
pub fn is_host_name(name: &str) -> bool {
    host_name(name.as_bytes()).is_some_and(|n| n == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_validated_and_lowercased() {
        let ok = |s: &str| host_name(s.as_bytes());
        assert_eq!(ok("WWW.Example.COM"), Some("www.example.com".into()));
        assert_eq!(ok("localhost"), Some("localhost".into()));
        assert_eq!(ok("a-1.b2.example"), Some("a-1.b2.example".into()));
        assert_eq!(
            ok("expyuzz4wqqyqhjn.onion"),
            Some("expyuzz4wqqyqhjn.onion".into())
        );
        assert_eq!(
            ok("xn--bcher-kva.example"),
            Some("xn--bcher-kva.example".into())
        );
        for bad in [
            "",
            ".",
            "example.com.",
            ".example.com",
            "a..b",
            "-a.com",
            "a-.com",
            "a_b.com",
            "a b.com",
            "bücher.example",
            "192.0.2.1",
            "1.2.3",
            "3232235521",
            "0x7f.1",
            "a.0x7f000001",
            "2001:db8::1",
            "[2001:db8::1]",
            "example.com:443",
        ] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
        let label = "a".repeat(63);
        assert!(ok(&format!("{label}.com")).is_some());
        assert!(ok(&format!("{label}a.com")).is_none());
        let long = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        assert_eq!(long.len(), 253);
        assert!(ok(&long).is_some());
        assert!(ok(&format!("{long}b")).is_none());
    }

    #[test]
    fn only_normalised_names_count_as_host_names() {
        assert!(is_host_name("via-proxy.example"));
        assert!(!is_host_name("Via-Proxy.example"));
        assert!(!is_host_name("198.51.100.10"));
        assert!(!is_host_name("via-proxy.example."));
    }

    #[test]
    fn names_sent_upstream_cannot_carry_anything_else() {
        // What an HTTP request line or a SOCKS5 length byte could be
        // abused with never passes.
        for bad in [
            "evil.com\r\nX-Injected: 1",
            "evil.com\n",
            "evil.com/path",
            "user@evil.com",
            "evil.com:80",
            "evil.com\0",
            "_srv.example",
            "EXAMPLE.com",
        ] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
        assert!(is_host_name("example.com"));
        assert!(is_host_name(&"a".repeat(63)));
        assert!(!is_host_name(&"a".repeat(64)));
    }
}
