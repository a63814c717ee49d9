//! The documentation stays true to the binary: every TOML example in
//! README.md and docs/ passes `tproxyd check`, and every relative link
//! points to a file (and heading) that exists.
//!
//! A block fenced ```` ```toml ```` is a whole configuration. A block
//! fenced ```` ```toml fragment ```` is merged into [`BASE`] first (tables
//! merged key by key, lists of tables appended), so a page can show one
//! section without repeating the outbounds and the firewall every time.
//! Any other `toml…` fence is an error: no example is skipped.
//!
//! Rule sets name files on a router (`/etc/tproxyd/chnroute.txt`); each
//! `path` is replaced by a small file of the set's `format` written here,
//! so the example is checked as written otherwise.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_tproxyd");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// What a fragment is merged into: the outbounds the pages' fragments
/// name, and a LAN to capture.
const BASE: &str = r#"
[[outbounds]]
name = "proxy"
type = "socks5"
server = "203.0.113.2:1080"

[[outbounds]]
name = "direct"
type = "direct"

[[outbounds]]
name = "deny"
type = "block"

[route]
final = "proxy"

[firewall]
lan_interfaces = ["br-lan"]
"#;

/// README.md and every Markdown file under docs/, sorted.
fn pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut out = vec![Path::new(ROOT).join("README.md")];
    walk(&Path::new(ROOT).join("docs"), &mut out);
    out.sort();
    out
}

fn shown(path: &Path) -> String {
    path.strip_prefix(ROOT)
        .unwrap_or(path)
        .display()
        .to_string()
}

struct Block {
    /// The fence's info string: `toml`, `toml fragment`, `sh`, ...
    info: String,
    /// 1-based line of the opening fence.
    line: usize,
    text: String,
}

/// The fenced blocks of a Markdown text (fences of three or more
/// backticks at the start of a line).
fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match open.take() {
            None if fence => {
                open = Some(Block {
                    info: line.trim_start().trim_start_matches('`').trim().to_string(),
                    line: i + 1,
                    text: String::new(),
                });
            }
            None => {}
            Some(b) if fence => out.push(b),
            Some(mut b) => {
                b.text.push_str(line);
                b.text.push('\n');
                open = Some(b);
            }
        }
    }
    assert!(open.is_none(), "a fenced block is never closed");
    out
}

/// Text outside fenced blocks, line by line with line numbers.
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut inside = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
        } else if !inside {
            out.push((i + 1, line));
        }
    }
    out
}

/// `base` with `top` merged in: tables key by key, arrays appended,
/// anything else replaced.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (Some(toml::Value::Array(b)), toml::Value::Array(t)) => b.extend(t),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A protobuf field: key, then a varint or length-delimited bytes.
fn field_len(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
    out.push(number << 3 | 2);
    let mut n = bytes.len();
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(bytes);
}

fn field_varint(out: &mut Vec<u8>, number: u8, value: u8) {
    out.push(number << 3);
    out.push(value);
}

/// A rule-set file of `format` holding a few entries (of `category`, for
/// the v2ray formats).
fn rule_set_file(format: &str, category: &str) -> Vec<u8> {
    match format {
        "cidr" => b"192.0.2.0/24\n2001:db8::/32\n".to_vec(),
        "domains" => b"example.com\nserver=/example.net/198.51.100.53\n".to_vec(),
        "geoip" => {
            let mut cidr = Vec::new();
            field_len(&mut cidr, 1, &[192, 0, 2, 0]);
            field_varint(&mut cidr, 2, 24);
            let mut geoip = Vec::new();
            field_len(&mut geoip, 1, category.as_bytes());
            field_len(&mut geoip, 2, &cidr);
            let mut list = Vec::new();
            field_len(&mut list, 1, &geoip);
            list
        }
        "geosite" => {
            let mut domain = Vec::new();
            field_varint(&mut domain, 1, 2); // RootDomain: a suffix
            field_len(&mut domain, 2, b"example.com");
            let mut site = Vec::new();
            field_len(&mut site, 1, category.as_bytes());
            field_len(&mut site, 2, &domain);
            let mut list = Vec::new();
            field_len(&mut list, 1, &site);
            list
        }
        other => panic!("rule set format {other:?} has no fixture here; add one"),
    }
}

/// Points every `route.rule_sets[].path` at a fixture of its format in `dir`.
fn with_fixtures(config: &mut toml::Table, dir: &Path, tag: &str) {
    let Some(sets) = config
        .get_mut("route")
        .and_then(|r| r.get_mut("rule_sets"))
        .and_then(|s| s.as_array_mut())
    else {
        return;
    };
    for (i, set) in sets.iter_mut().enumerate() {
        let Some(set) = set.as_table_mut() else {
            continue;
        };
        let format = set.get("format").and_then(|f| f.as_str()).unwrap_or("");
        let category = set.get("category").and_then(|c| c.as_str()).unwrap_or("");
        let file = dir.join(format!("{tag}-set{i}.{format}"));
        std::fs::write(&file, rule_set_file(format, category)).unwrap();
        set.insert("path".into(), file.display().to_string().into());
    }
}

/// Runs `tproxyd check` on `text`; Err with its message when refused.
fn check(text: &str, dir: &Path, tag: &str) -> Result<(), String> {
    let file = dir.join(format!("{tag}.toml"));
    std::fs::write(&file, text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&file)
        .env("TPROXYD_PASSWORD", "example-password")
        .env_remove("TPROXYD_USERNAME")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": ok") {
        Ok(())
    } else {
        Err(format!(
            "exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The example as `tproxyd check` is to see it, or why it cannot be one.
fn prepare(block: &Block, dir: &Path, tag: &str) -> Result<String, String> {
    let mut config = match block.info.as_str() {
        "toml" => toml::Table::new(),
        "toml fragment" => BASE.parse::<toml::Table>().unwrap(),
        other => {
            return Err(format!(
                "fence \"```{other}\": write ```toml (a whole config) or ```toml fragment"
            ))
        }
    };
    let own: toml::Table = block.text.parse().map_err(|e| format!("not TOML: {e}"))?;
    merge(&mut config, own);
    with_fixtures(&mut config, dir, tag);
    Ok(config.to_string())
}

#[test]
fn every_toml_example_passes_check() {
    let dir = std::env::temp_dir().join(format!("tproxyd-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for (n, block) in blocks(&text).iter().enumerate() {
            if !block.info.starts_with("toml") {
                continue;
            }
            let tag = format!("{}-{n}", shown(&page).replace('/', "_"));
            let result = prepare(block, &dir, &tag).and_then(|t| check(&t, &dir, &tag));
            checked += 1;
            if let Err(e) = result {
                failures.push(format!("{}:{}: {e}", shown(&page), block.line));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(checked >= 10, "only {checked} TOML examples found");
    assert!(
        failures.is_empty(),
        "{} of {checked} TOML examples fail `tproxyd check`:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped,
/// spaces as hyphens; a repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    for (_, line) in prose(text) {
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        let title = title.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut k = 0;
        while out.contains(&unique) {
            k += 1;
            unique = format!("{slug}-{k}");
        }
        out.insert(unique);
    }
    out
}

#[test]
fn every_relative_link_points_to_a_file_and_heading_that_exist() {
    let link = regex::Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let here = page.parent().unwrap();
        for (line_no, line) in prose(&text) {
            for target in link.captures_iter(line).map(|c| c[1].to_string()) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (file, anchor) = match target.split_once('#') {
                    Some((f, a)) => (f, Some(a)),
                    None => (target.as_str(), None),
                };
                let path = if file.is_empty() {
                    page.clone()
                } else {
                    here.join(file)
                };
                let problem = if !path.exists() {
                    Some("no such file".to_string())
                } else if let Some(anchor) = anchor {
                    let target_text = std::fs::read_to_string(&path).unwrap_or_default();
                    (!anchors(&target_text).contains(anchor))
                        .then(|| format!("{} has no heading #{anchor}", shown(&path)))
                } else {
                    None
                };
                if let Some(p) = problem {
                    broken.push(format!("{}:{line_no}: ({target}): {p}", shown(&page)));
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} relative links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Every name in the map's code block: `word.rs`, `word/` and the like.
fn map_names(map: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    for word in map.split(|c: char| c.is_whitespace() || "(),:;`".contains(c)) {
        let word = word.trim_end_matches('.');
        if word.ends_with(".rs") || word.ends_with(".bin") || word.ends_with('/') {
            // `src/relay/` and `relay/` both name the folder `relay`;
            // `udp/hold.rs` names `hold.rs` (in the folder `udp`).
            if let Some(last) = word.trim_end_matches('/').rsplit('/').next() {
                names.insert(last.to_string());
            }
        }
    }
    names
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("read_dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// docs/architecture.md's map of src/ names every file there is (a
/// folder of test data may stand for its files), and names no `.rs` file
/// that is gone: a file moved or added without the map is a failure here,
/// not a stale page a newcomer trusts.
#[test]
fn the_architecture_map_names_every_source_file() {
    let page = std::fs::read_to_string(Path::new(ROOT).join("docs/architecture.md"))
        .expect("docs/architecture.md");
    let start = page.find("## The map").expect("a '## The map' section");
    let block = &page[start..];
    let open = block.find("```").expect("the map's code block") + 3;
    let close = open + block[open..].find("```").expect("the map's closing fence");
    let names = map_names(&block[open..close]);

    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    files_under(&src, &mut files);
    let mut missing = Vec::new();
    let mut existing = HashSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        for part in rel.iter() {
            existing.insert(part.to_string_lossy().into_owned());
        }
        let name = rel.file_name().expect("a file name").to_string_lossy();
        let folder = rel
            .parent()
            .and_then(|p| p.file_name())
            .map(|f| format!("{}", f.to_string_lossy()));
        let named = names.contains(name.as_ref())
            || (rel.extension().is_none_or(|e| e != "rs")
                && folder.is_some_and(|f| names.contains(&f)));
        if !named {
            missing.push(rel.display().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "docs/architecture.md's map does not name: {missing:?}"
    );
    let mut gone: Vec<_> = names
        .iter()
        .filter(|n| n.ends_with(".rs") && !existing.contains(*n))
        .cloned()
        .collect();
    gone.sort();
    assert!(
        gone.is_empty(),
        "docs/architecture.md's map names files that are not in src/: {gone:?}"
    );
}
