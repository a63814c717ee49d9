//! The `domains` format: one domain suffix per line (chnlist, gfwlist,
//! Loyalsoldier's *-list.txt), `#` comments. Also accepted:
//! - dnsmasq lines `server=/a.com/b.com/114.114.114.114`, `ipset=/a.com/set`
//!   (and `nftset=`, `address=`, `local=`): the domains between the slashes;
//! - v2ray-style prefixes `domain:` (suffix, the default), `full:` (exact),
//!   `keyword:`, `regexp:` / `regex:`, as in Loyalsoldier's lists;
//! - a leading `.` or `+.` on a suffix (Clash style), which changes nothing:
//!   a suffix already covers the name itself and its subdomains.

/// Names a rule set contributes, by how they match. Exact names and
/// suffixes are lowercased without a trailing dot; regexes are kept as
/// written (lowercasing `\D` would change its meaning) and matched
/// case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Domains {
    pub exact: Vec<String>,
    pub suffix: Vec<String>,
    pub keyword: Vec<String>,
    pub regex: Vec<String>,
}

impl Domains {
    pub fn len(&self) -> usize {
        self.exact.len() + self.suffix.len() + self.keyword.len() + self.regex.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Longest DNS name (RFC 1035), without the trailing dot.
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// A host name as the matcher stores it: trimmed, lowercased, without the
/// trailing dot; refused if it cannot be a DNS name (empty label, a space,
/// a wildcard, non-ASCII: international names must be given in their
/// `xn--` form, which is what sniffing sees).
pub fn normalize(name: &str) -> Result<String, String> {
    let name = name.trim();
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("an empty name".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("{name:?} is longer than {MAX_NAME} characters"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        let hint = match bad {
            '*' => ": no wildcards; a suffix already matches every subdomain",
            c if !c.is_ascii() => ": write international names in their xn-- form",
            _ => "",
        };
        return Err(format!("{name:?}: {bad:?} cannot be in a host name{hint}"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("{name:?} has an empty label"));
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "{name:?}: a label is longer than {MAX_LABEL} characters"
            ));
        }
    }
    Ok(name.to_ascii_lowercase())
}

/// A suffix: like [`normalize`], after dropping a leading `.` or `+.`.
pub fn normalize_suffix(name: &str) -> Result<String, String> {
    let name = name.trim();
    let name = name
        .strip_prefix("+.")
        .or_else(|| name.strip_prefix('.'))
        .unwrap_or(name);
    normalize(name)
}

/// A keyword: any non-empty text, lowercased (names are matched lowercased).
pub fn normalize_keyword(word: &str) -> Result<String, String> {
    let word = word.trim();
    if word.is_empty() {
        return Err("an empty keyword".into());
    }
    Ok(word.to_ascii_lowercase())
}

/// dnsmasq options whose value is `/domain/.../something`.
const DNSMASQ_KEYS: [&str; 5] = ["server", "local", "address", "ipset", "nftset"];

pub fn parse(label: &str, bytes: &[u8]) -> Result<Domains, String> {
    let mut out = Domains::default();
    for line in super::lines(label, bytes) {
        let (n, text) = line?;
        parse_line(text, &mut out).map_err(|why| format!("{label}:{n}: {why}"))?;
    }
    Ok(out)
}

fn parse_line(text: &str, out: &mut Domains) -> Result<(), String> {
    if let Some((key, value)) = text.split_once('=') {
        let key = key.trim();
        if !DNSMASQ_KEYS.contains(&key) {
            return Err(format!(
                "{key:?} is not a dnsmasq line this reads (server=, ipset=, nftset=, address=, local=)"
            ));
        }
        // `/a.com/b.com/target`: the names are between the first and the
        // last slash.
        let parts: Vec<&str> = value.trim().split('/').collect();
        if parts.len() < 3 || !parts[0].is_empty() {
            return Err(format!("{key}= wants /domain/...: {text:?}"));
        }
        for d in &parts[1..parts.len() - 1] {
            out.suffix.push(normalize_suffix(d)?);
        }
        return Ok(());
    }
    match text.split_once(':') {
        Some(("domain", v)) => out.suffix.push(normalize_suffix(v)?),
        Some(("full", v)) => out.exact.push(normalize(v)?),
        Some(("keyword", v)) => out.keyword.push(normalize_keyword(v)?),
        Some(("regexp" | "regex", v)) => {
            let v = v.trim();
            if v.is_empty() {
                return Err("an empty regex".into());
            }
            out.regex.push(v.to_string());
        }
        Some(("include", _)) => {
            return Err("include: is not supported; list the file as a rule set of its own".into())
        }
        Some((kind, _)) => {
            return Err(format!(
                "{kind:?}: not a kind of entry (domain:, full:, keyword:, regexp:)"
            ))
        }
        None => out.suffix.push(normalize_suffix(text)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_suffixes_comments_and_case() {
        let d = parse(
            "l",
            b"# gfwlist\nGoogle.COM\n.youtube.com.\n+.x.org # clash\n\nxn--fiqs8s\n",
        )
        .unwrap();
        assert_eq!(
            d.suffix,
            vec!["google.com", "youtube.com", "x.org", "xn--fiqs8s"]
        );
        assert!(d.exact.is_empty() && d.keyword.is_empty() && d.regex.is_empty());
    }

    #[test]
    fn dnsmasq_lines_give_their_domains() {
        let d = parse(
            "china.conf",
            b"server=/0-100.com/114.114.114.114\nipset=/a.cn/b.cn/chnroute\nnftset=/c.cn/4#inet#t#s\nserver=/d.cn/\n",
        )
        .unwrap();
        assert_eq!(d.suffix, vec!["0-100.com", "a.cn", "b.cn", "c.cn", "d.cn"]);
        let e = parse("china.conf", b"a.cn\nserver=a.cn/1.1.1.1\n").unwrap_err();
        assert!(e.starts_with("china.conf:2: server= wants"), "{e}");
        let e = parse("c", b"conf-file=/x\n").unwrap_err();
        assert!(e.starts_with("c:1: \"conf-file\""), "{e}");
    }

    #[test]
    fn v2ray_style_prefixes() {
        let d = parse(
            "l",
            b"domain:A.com\nfull:www.B.com\nkeyword:Ads\nregexp:^ad[0-9]+\\.\nregex:\\Dx\n",
        )
        .unwrap();
        assert_eq!(d.suffix, vec!["a.com"]);
        assert_eq!(d.exact, vec!["www.b.com"]);
        assert_eq!(d.keyword, vec!["ads"]);
        assert_eq!(d.regex, vec!["^ad[0-9]+\\.", "\\Dx"]);
        assert!(parse("l", b"include:other\n")
            .unwrap_err()
            .contains("include"));
        assert!(parse("l", b"geosite:cn\n")
            .unwrap_err()
            .starts_with("l:1: "));
    }

    #[test]
    fn names_that_cannot_be_host_names_are_refused_with_the_line() {
        for (text, why) in [
            ("a..com", "empty label"),
            ("*.a.com", "no wildcards"),
            ("a com", "' '"),
            ("例子.cn", "xn--"),
            (".", "empty name"),
        ] {
            let e = parse("l", format!("ok.com\n{text}\n").as_bytes()).unwrap_err();
            assert!(e.starts_with("l:2: ") && e.contains(why), "{text}: {e}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(parse("l", long.as_bytes()).unwrap_err().contains("label"));
        let e = normalize(&"a.".repeat(130)).unwrap_err();
        assert!(e.contains("longer than 253"), "{e}");
    }
}
