//! HTTP/1: the Host header of a request.
//!
//! Only the request line and the header lines are read, up to the Host
//! header. A request line that is not `METHOD SP target SP HTTP/1.x` with
//! a known method is not HTTP; a request without a usable Host (HTTP/1.0,
//! an IP literal) is HTTP without a name.

use super::{Sniff, MAX_SNIFF_BYTES};
use crate::hostname::host_name;

/// The methods of RFC 9110 and RFC 5789 (PATCH). Compared case-
/// insensitively, as mihomo does: no client sends lowercase methods, and
/// accepting them costs nothing.
const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"PATCH", b"TRACE",
];

/// Sniffs `bytes`, the start of a TCP stream.
pub fn sniff(bytes: &[u8]) -> Sniff {
    let need_more = || {
        if bytes.len() < MAX_SNIFF_BYTES {
            Sniff::NeedMore
        } else {
            Sniff::NotThis
        }
    };
    // The method and its space, checked byte by byte as they arrive.
    let mut method_done = false;
    let mut maybe = false;
    for m in METHODS {
        let n = bytes.len().min(m.len() + 1);
        let prefix_ok = bytes[..n.min(m.len())].eq_ignore_ascii_case(&m[..n.min(m.len())])
            && (n <= m.len() || bytes[m.len()] == b' ');
        if prefix_ok {
            maybe = true;
            method_done |= n == m.len() + 1;
        }
    }
    if !maybe {
        return Sniff::NotThis;
    }
    let mut lines = Lines { rest: bytes };
    let Some(request_line) = lines.next() else {
        return need_more();
    };
    if !method_done || !valid_request_line(request_line) {
        return Sniff::NotThis;
    }
    // The header lines, up to the Host header or the blank line.
    loop {
        let Some(line) = lines.next() else {
            return if bytes.len() < MAX_SNIFF_BYTES {
                Sniff::NeedMore
            } else {
                // A request whose headers never end within the bound is
                // still HTTP, with no name found.
                Sniff::Found { host: None }
            };
        };
        if line.is_empty() {
            return Sniff::Found { host: None };
        }
        if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"host:") {
            return Sniff::Found {
                host: authority_host(trim(&line[5..])),
            };
        }
    }
}

/// Lines ending in LF (CR before it dropped); the last, unterminated
/// piece is not a line yet.
struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let end = self.rest.iter().position(|&b| b == b'\n')?;
        let line = &self.rest[..end];
        self.rest = &self.rest[end + 1..];
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }
}

/// `METHOD SP request-target SP HTTP/1.x` with a visible-ASCII target.
fn valid_request_line(line: &[u8]) -> bool {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(_method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !target.is_empty()
        && target.iter().all(|b| b.is_ascii_graphic())
        && version.len() == 8
        && version.starts_with(b"HTTP/1.")
        && version[7].is_ascii_digit()
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = s.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(a), Some(b)) => &s[a..=b],
        _ => &[],
    }
}

/// The host of a Host header value (`host[:port]`): the port dropped, one
/// trailing dot allowed (an absolute name), IP literals refused.
fn authority_host(value: &[u8]) -> Option<String> {
    if value.first() == Some(&b'[') {
        // An IPv6 literal.
        return None;
    }
    let host = match value.iter().rposition(|&b| b == b':') {
        Some(colon) => {
            let port = &value[colon + 1..];
            if !port.iter().all(u8::is_ascii_digit) {
                return None;
            }
            &value[..colon]
        }
        None => value,
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    host_name(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn found(host: Option<&str>) -> Sniff {
        Sniff::Found {
            host: host.map(str::to_string),
        }
    }

    #[test]
    fn the_host_header_of_a_request() {
        let req = b"GET /index.html HTTP/1.1\r\nUser-Agent: t\r\nHOST: Via-Proxy.Example:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(sniff(req), found(Some("via-proxy.example")));
        // Found as soon as the Host line is complete.
        let host_end = 71;
        assert_eq!(req[host_end - 1], b'\n');
        for n in 0..req.len() {
            let want = if n < host_end {
                Sniff::NeedMore
            } else {
                found(Some("via-proxy.example"))
            };
            assert_eq!(sniff(&req[..n]), want, "prefix {n}");
        }
        assert_eq!(
            sniff(b"post /x HTTP/1.0\nhost:\ta.example.\n\n"),
            found(Some("a.example"))
        );
        assert_eq!(
            sniff(b"CONNECT b.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n"),
            found(Some("b.example"))
        );
    }

    #[test]
    fn requests_without_a_usable_host_are_http_without_a_name() {
        for req in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: 198.51.100.10\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: 198.51.100.10:80\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: 2001:db8::1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: bad_name.example\r\n\r\n",
        ] {
            assert_eq!(
                sniff(req),
                found(None),
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn other_protocols_are_not_http() {
        for bytes in [
            &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
            b"\x16\x03\x01",
            b"GETX / HTTP/1.1\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET / SPDY/1.1\r\n",
            b"GET /a b HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n",
            b"get",
        ] {
            let answer = sniff(bytes);
            if bytes == b"get" {
                assert_eq!(answer, Sniff::NeedMore);
            } else {
                assert_eq!(
                    answer,
                    Sniff::NotThis,
                    "{:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
        assert_eq!(sniff(b"G"), Sniff::NeedMore);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET"), Sniff::NeedMore);
        assert_eq!(sniff(b"GETS"), Sniff::NotThis);
        assert_eq!(sniff(b"X"), Sniff::NotThis);
    }

    #[test]
    fn the_bound_ends_the_wait() {
        let mut long_line = b"GET /".to_vec();
        long_line.resize(MAX_SNIFF_BYTES, b'a');
        assert_eq!(sniff(&long_line), Sniff::NotThis);
        let mut endless = b"GET / HTTP/1.1\r\n".to_vec();
        while endless.len() < MAX_SNIFF_BYTES {
            endless.extend(b"X-Filler: 1\r\n");
        }
        assert_eq!(sniff(&endless), found(None));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = sniff(&bytes);
        }

        #[test]
        fn never_panics_behind_a_valid_request_line(
            method in prop::sample::select(METHODS.to_vec()),
            rest in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let mut bytes = method.to_vec();
            bytes.extend(b" / HTTP/1.1\r\nHost: ");
            bytes.extend(rest);
            if let Sniff::Found { host: Some(h) } = sniff(&bytes) {
                prop_assert!(crate::hostname::is_host_name(&h), "{:?}", h);
            }
        }

        #[test]
        fn finds_any_valid_host(
            name in "[a-z][a-z0-9-]{0,20}[a-z0-9](\\.[a-z][a-z0-9]{0,10}){0,3}",
            port in proptest::option::of(any::<u16>()),
            cut in any::<prop::sample::Index>(),
        ) {
            let host = match port { Some(p) => format!("{name}:{p}"), None => name.clone() };
            let req = format!("GET / HTTP/1.1\r\nAccept: */*\r\nHost: {host}\r\n\r\n");
            prop_assert_eq!(sniff(req.as_bytes()), found(Some(&name)));
            let at = cut.index(req.len());
            let answer = sniff(&req.as_bytes()[..at]);
            prop_assert!(answer == Sniff::NeedMore || answer == found(Some(&name)));
        }
    }
}
