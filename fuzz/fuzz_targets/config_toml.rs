//! The TOML config: `RawConfig::from_toml` then `validate` (with a fake
//! environment), as `tproxyd run -c FILE` and `tproxyd check` read it.
//!
//! Invariants: a config that validates respects every documented bound,
//! and no error message shows a password written in the file. The
//! password to look for is the sentinel SECRET: when the input holds it
//! once, as the value of a `password` key in any TOML form (table key,
//! dotted key, inline table, multi-line string), no message may hold it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxyd::config::{self, Backend, Mode, RawConfig};
use tproxyd::outbound::{socks5, OutboundKind};

const SECRET: &str = "Zx9Sentinel";

/// Whether the one SECRET in `text` is (part of) the value of a key named
/// password: the last `=` before it belongs to such a key, and no line
/// break comes between them unless a multi-line string opened there.
fn secret_is_a_password(text: &str) -> bool {
    let Some(at) = text.find(SECRET) else {
        return false;
    };
    if text[at + SECRET.len()..].contains(SECRET) {
        return false;
    }
    let before = &text[..at];
    let Some(eq) = before.rfind('=') else {
        return false;
    };
    let value = &before[eq + 1..];
    if value.contains('\n') && !(value.contains("\"\"\"") || value.contains("'''")) {
        return false;
    }
    let key_start = before[..eq]
        .rfind(['\n', '{', ',', '='])
        .map_or(0, |i| i + 1);
    let key = before[key_start..eq].trim();
    let last = key.rsplit('.').next().unwrap_or(key).trim();
    last.trim_matches(['"', '\'']) == "password"
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |k: &str| (k == "TPROXYD_PASSWORD").then(|| "from-env".to_string());
    let result = RawConfig::from_toml(text, "fuzz.toml").and_then(|raw| raw.validate(&env));
    match result {
        Err(e) => {
            if secret_is_a_password(text) {
                let shown = e.to_string();
                assert!(
                    !shown.contains(SECRET),
                    "the password appears in the error:\n{shown}"
                );
            }
        }
        Ok(cfg) => {
            assert_ne!(cfg.listen.port(), 0);
            assert_eq!(cfg.listen.ip().to_canonical(), cfg.listen.ip());
            assert_ne!(cfg.mark, 0);
            assert!(cfg.tcp || cfg.udp);
            assert!(!(cfg.mode == Mode::Redirect && cfg.udp));
            let t = &cfg.timeouts;
            for d in [
                t.connect,
                t.tcp_idle,
                t.udp_idle,
                t.udp_dns_idle,
                t.udp_unreplied,
            ] {
                assert!(
                    (1..=config::MAX_TIMEOUT_SECS).contains(&d.as_secs()),
                    "{d:?}"
                );
            }
            let l = &cfg.limits;
            for n in [
                l.udp_sessions,
                l.udp_sessions_per_client,
                l.udp_reply_sockets,
                l.tcp_flows,
                l.tcp_connecting_per_client,
            ] {
                assert!((1..=config::MAX_TABLE_ENTRIES).contains(&n), "{n}");
            }
            assert!(l.udp_sessions_per_client <= l.udp_sessions);
            assert!(l.tcp_connecting_per_client <= l.tcp_flows);
            assert!((1..=config::MAX_THREADS).contains(&l.threads));
            for o in &cfg.outbounds {
                if let OutboundKind::Socks5(socks5::Settings { auth: Some(c), .. }) = &o.kind {
                    assert!((1..=255).contains(&c.username.len()));
                    assert!((1..=255).contains(&c.password.len()));
                }
            }
            // Every name a rule, a group or route.final uses exists.
            let known = |n: &str| cfg.outbounds.iter().any(|o| o.name == n);
            assert!(known(&cfg.route.final_outbound));
            for r in &cfg.route.rules {
                assert!(known(&r.outbound));
            }
            for o in &cfg.outbounds {
                for m in o.kind.members() {
                    assert!(known(m));
                }
            }
            let fw = &cfg.firewall;
            if fw.backend != Backend::None {
                assert!(fw.route_mark != 0 && fw.route_mark != cfg.mark);
                assert!(fw.route_table != 0 && !(253..=255).contains(&fw.route_table));
                assert!((1..32766).contains(&fw.rule_priority));
                assert!(
                    !fw.lan_interfaces.is_empty() || !fw.source_cidrs.is_empty() || fw.proxy_local
                );
                if cfg.mode == Mode::Redirect {
                    assert!(cfg.listen.ip().is_unspecified());
                }
            }
            for name in &fw.lan_interfaces {
                // Names go into rule text: nothing that could end a token.
                assert!(name.len() <= 15 && !name.is_empty());
                assert!(!name.contains(|c: char| c.is_whitespace() || c == '"' || c == ';'));
            }
            for r in fw.tcp_ports.iter().chain(&fw.udp_ports) {
                assert!(r.first >= 1 && r.first <= r.last);
            }
        }
    }
});
