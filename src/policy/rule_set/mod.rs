//! Rule sets: named lists of prefixes or domains read from files, which
//! rules name in `rule_set` to add to their own `dst` or domain values.
//!
//! Formats: `cidr` (one prefix per line), `domains` (one suffix per line,
//! dnsmasq lines accepted), `geoip` and `geosite` (v2ray protobuf, one
//! category). Every parser reports the first problem as `file:line: why`
//! (`file: byte N: why` for the binary formats) and never panics.

pub mod cidr;
pub mod domains;
pub mod geodat;

use std::io::Read;
use std::path::Path;

use crate::cidr::Cidr;
use crate::config::{RuleSetConfig, RuleSetFormat};

pub use domains::Domains;

/// Larger files are refused before they are read: the biggest published
/// lists (geoip.dat with every country, ~20 MB) fit well below this, and
/// a wrong path (a disk image, /dev/zero) must not fill the memory.
pub const MAX_FILE_BYTES: u64 = 128 << 20;

/// What a rule set adds to the rules that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSet {
    /// Destination prefixes (`cidr`, `geoip`): joins a rule's `dst`.
    Prefixes(Vec<Cidr>),
    /// Names (`domains`, `geosite`): join a rule's domain keys.
    Domains(Domains),
}

impl RuleSet {
    /// Reads and parses the file a rule set names.
    pub fn load(cfg: &RuleSetConfig) -> Result<RuleSet, String> {
        let label = cfg.path.display().to_string();
        let bytes = read_capped(&cfg.path, MAX_FILE_BYTES)?;
        let category = cfg.category.as_deref().unwrap_or("");
        Self::parse(cfg.format, &label, &bytes, category)
    }

    /// Parses a file's bytes; `label` names it in messages.
    pub fn parse(
        format: RuleSetFormat,
        label: &str,
        bytes: &[u8],
        category: &str,
    ) -> Result<RuleSet, String> {
        match format {
            RuleSetFormat::Cidr => cidr::parse(label, bytes).map(RuleSet::Prefixes),
            RuleSetFormat::Domains => domains::parse(label, bytes).map(RuleSet::Domains),
            RuleSetFormat::Geoip => geodat::geoip(label, bytes, category).map(RuleSet::Prefixes),
            RuleSetFormat::Geosite => geodat::geosite(label, bytes, category).map(RuleSet::Domains),
        }
    }
}

/// The whole file, refused if larger than `cap` (read through a limit, so
/// a file that grows or lies about its size cannot get past it).
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, String> {
    let label = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("{label}: cannot open: {e}"))?;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{label}: cannot read: {e}"))?;
    if bytes.len() as u64 > cap {
        return Err(format!(
            "{label}: larger than {} MiB; is this the right file?",
            cap >> 20
        ));
    }
    Ok(bytes)
}

/// The lines of a text file with their 1-based numbers, comments (`#` to
/// the end of the line) and surrounding blanks removed, empty lines
/// skipped. A line that is not UTF-8 or absurdly long is an error.
pub(crate) fn lines<'a>(
    label: &'a str,
    bytes: &'a [u8],
) -> impl Iterator<Item = Result<(usize, &'a str), String>> + 'a {
    // A byte-order mark some editors on Windows write.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter_map(move |(i, raw)| {
            let n = i + 1;
            if raw.len() > MAX_LINE_BYTES {
                return Some(Err(format!(
                    "{label}:{n}: line longer than {MAX_LINE_BYTES} bytes"
                )));
            }
            let text = match std::str::from_utf8(raw) {
                Ok(t) => t,
                Err(_) => return Some(Err(format!("{label}:{n}: not UTF-8 text"))),
            };
            let text = text.split('#').next().unwrap_or("").trim();
            (!text.is_empty()).then_some(Ok((n, text)))
        })
}

/// Longer lines are not prefixes or names: a binary file read as text.
const MAX_LINE_BYTES: usize = 8192;

#[cfg(test)]
pub(crate) mod testdir {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system's temp dir, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "tproxyd-rules-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }

        pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).expect("write temp file");
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdir::TempDir;
    use super::*;

    fn cfg(format: RuleSetFormat, path: &Path, category: Option<&str>) -> RuleSetConfig {
        RuleSetConfig {
            name: "s".into(),
            format,
            path: path.to_path_buf(),
            category: category.map(str::to_string),
        }
    }

    #[test]
    fn load_reads_each_format_from_a_file() {
        let d = TempDir::new();
        let p = d.write("cn.txt", b"1.0.1.0/24\n");
        assert_eq!(
            RuleSet::load(&cfg(RuleSetFormat::Cidr, &p, None)).unwrap(),
            RuleSet::Prefixes(vec!["1.0.1.0/24".parse().unwrap()])
        );
        let p = d.write("list.txt", b"example.com\n");
        let RuleSet::Domains(list) = RuleSet::load(&cfg(RuleSetFormat::Domains, &p, None)).unwrap()
        else {
            panic!("domains")
        };
        assert_eq!(list.suffix, vec!["example.com".to_string()]);
    }

    #[test]
    fn missing_and_oversized_files_are_refused_with_the_path() {
        let d = TempDir::new();
        let missing = d.0.join("nope.txt");
        let e = RuleSet::load(&cfg(RuleSetFormat::Cidr, &missing, None)).unwrap_err();
        assert!(e.contains("nope.txt: cannot open"), "{e}");
        let p = d.write("big", &[b'#'; 100]);
        let e = read_capped(&p, 10).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
        assert_eq!(read_capped(&p, 100).unwrap().len(), 100);
    }

    #[test]
    fn lines_skip_comments_blanks_and_a_bom() {
        let text = b"\xEF\xBB\xBFa # one\n\n  # only a comment\r\nb\r\n";
        let got: Vec<_> = lines("f", text).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, vec![(1, "a"), (4, "b")]);
        let bad: Vec<_> = lines("f", b"ok\n\xff\xfe\n").collect();
        assert_eq!(bad[1], Err("f:2: not UTF-8 text".to_string()));
    }
}

#[cfg(test)]
mod properties {
    use super::cidr::{complement, range_of};
    use super::geodat::{encode, geoip, geosite};
    use super::*;
    use proptest::prelude::*;

    /// Bytes that look like a valid file, then damaged: flipped bytes and
    /// a cut, which reach the deeper error paths random bytes rarely do.
    fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        let len = valid.len().max(1);
        (prop::collection::vec((0..len, any::<u8>()), 0..4), 0..=len).prop_map(
            move |(flips, cut)| {
                let mut b = valid.clone();
                for (i, v) in flips {
                    if let Some(x) = b.get_mut(i) {
                        *x = v;
                    }
                }
                b.truncate(cut);
                b
            },
        )
    }

    fn sample_geoip() -> Vec<u8> {
        encode::geoip(&[
            (
                "CN",
                vec![(vec![1, 0, 1, 0], 24), (vec![0x24; 16], 12)],
                false,
            ),
            ("PRIVATE", vec![(vec![10, 0, 0, 0], 8)], true),
        ])
    }

    fn sample_geosite() -> Vec<u8> {
        encode::geosite(&[
            (
                "CN",
                vec![
                    (0, "baidu"),
                    (1, "^a\\d"),
                    (2, "qq.com"),
                    (3, "www.163.com"),
                ],
            ),
            ("ADS", vec![(2, "ads.example")]),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn text_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = cidr::parse("f", &bytes);
            let _ = domains::parse("f", &bytes);
        }

        #[test]
        fn text_parsers_never_panic_on_near_misses(text in "[0-9a-fA-F:./#=+*_ \\n\\r-]{0,120}") {
            let _ = cidr::parse("f", text.as_bytes());
            let _ = domains::parse("f", text.as_bytes());
        }

        #[test]
        fn geodat_readers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = geoip("f", &bytes, "cn");
            let _ = geosite("f", &bytes, "cn");
        }

        #[test]
        fn geodat_readers_never_panic_on_damaged_files(
            ip in mutated(sample_geoip()),
            site in mutated(sample_geosite()),
        ) {
            for cat in ["cn", "private", "ads"] {
                let _ = geoip("f", &ip, cat);
                let _ = geosite("f", &site, cat);
                let _ = geoip("f", &site, cat);
                let _ = geosite("f", &ip, cat);
            }
        }

        #[test]
        fn geoip_gives_back_what_was_encoded(
            cidrs in prop::collection::vec(
                prop_oneof![
                    (any::<[u8; 4]>(), 0u32..=32).prop_map(|(a, p)| (a.to_vec(), p)),
                    (any::<[u8; 16]>(), 0u32..=128).prop_map(|(a, p)| (a.to_vec(), p)),
                ],
                0..20,
            )
        ) {
            let bytes = encode::geoip(&[("X", cidrs.clone(), false)]);
            let got = geoip("f", &bytes, "x").unwrap();
            let want: Vec<Cidr> = cidrs
                .iter()
                .map(|(ip, p)| {
                    let addr: std::net::IpAddr = match ip.len() {
                        4 => <[u8; 4]>::try_from(&ip[..]).unwrap().into(),
                        _ => <[u8; 16]>::try_from(&ip[..]).unwrap().into(),
                    };
                    format!("{addr}/{p}").parse().unwrap()
                })
                .collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn the_complement_holds_exactly_the_other_addresses(
            list in prop::collection::vec((any::<u32>(), 0u8..=32), 0..8),
            probes in prop::collection::vec(any::<u32>(), 16),
        ) {
            let list: Vec<Cidr> = list
                .iter()
                .map(|(a, p)| format!("{}/{p}", std::net::Ipv4Addr::from(*a)).parse().unwrap())
                .collect();
            let inv = complement(&list);
            // No two pieces of the complement overlap.
            let mut ranges: Vec<_> = inv.iter().filter(|c| c.is_ipv4()).map(range_of).collect();
            ranges.sort_unstable();
            prop_assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0));
            // Probes: the list's own starts and ends too.
            let edges = list.iter().flat_map(|c| {
                let (lo, hi) = range_of(c);
                [lo as u32, hi as u32, (lo as u32).wrapping_sub(1), (hi as u32).wrapping_add(1)]
            });
            for a in probes.into_iter().chain(edges) {
                let host = Cidr::host(std::net::Ipv4Addr::from(a).into());
                let in_list = list.iter().any(|c| c.contains(&host));
                let in_inv = inv.iter().any(|c| c.contains(&host));
                prop_assert_ne!(in_list, in_inv, "{}", host);
            }
        }
    }
}
