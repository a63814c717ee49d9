//! Output of system tools that tproxyd reads: `iptables-save` (to build
//! the removal transaction of tproxyd's own rules) and what `tproxyd
//! doctor` parses (`nft list table`, `iptables-save`, `ss -H`,
//! /proc/net/{tcp,udp}). The input is the listing.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use tproxyd::firewall::iptables::{own_chain, removal};
use tproxyd::fuzzing;

fn check_removal(save: &str) {
    let Some(tx) = removal(save, "mangle") else {
        return;
    };
    let lines: Vec<&str> = tx.lines().collect();
    assert_eq!(lines.first(), Some(&"*mangle"));
    assert_eq!(lines.last(), Some(&"COMMIT"));
    assert!(tx.ends_with("COMMIT\n"));
    let input: Vec<&str> = save.lines().collect();
    for l in &lines[1..lines.len() - 1] {
        if let Some(rest) = l.strip_prefix("-D ") {
            // Deletes exactly a rule that is there ...
            let added = format!("-A {rest}");
            assert!(
                input.contains(&added.as_str()),
                "deletes a rule not listed: {l}"
            );
            assert!(rest.starts_with("PREROUTING ") || rest.starts_with("OUTPUT "));
            // ... and whose target, as iptables itself reads the line, is
            // one of tproxyd's chains: never someone else's rule.
            let words = tproxyd::fuzzing::iptables_words(l);
            let target = words
                .iter()
                .rposition(|w| w == "-j")
                .and_then(|i| words.get(i + 1));
            assert!(
                target.is_some_and(|t| own_chain(t).is_some()),
                "deletes a rule that jumps to {target:?}: {l:?}"
            );
        } else if let Some(c) = l.strip_prefix("-X ") {
            assert!(own_chain(c).is_some(), "deletes chain {c:?}");
        } else if let Some(decl) = l.strip_prefix(':') {
            assert!(
                decl.strip_suffix(" - [0:0]")
                    .is_some_and(|c| own_chain(c).is_some()),
                "declares {l:?}"
            );
        } else {
            panic!("unexpected line {l:?} in\n{tx}");
        }
    }
}

fn shown(addr: Option<IpAddr>, port: u16) -> String {
    match addr {
        None => format!(":{port}"),
        Some(IpAddr::V4(a)) => format!("{a}:{port}"),
        Some(IpAddr::V6(a)) => format!("[{a}]:{port}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_removal(text);

    for (v4, addr, port) in fuzzing::nft_targets(text)
        .into_iter()
        .chain(fuzzing::iptables_targets(text, true))
        .chain(fuzzing::iptables_targets(text, false))
    {
        // "Any address" is kept as None, never as 0.0.0.0 or ::.
        assert!(addr.is_none_or(|a| !a.is_unspecified()));
        let _ = v4;
        // What was read prints as nft writes it and reads back the same.
        assert_eq!(
            fuzzing::split_target(&shown(addr, port)),
            Some((addr, port))
        );
    }
    for word in text.split_whitespace() {
        if let Some((addr, port)) = fuzzing::split_target(word) {
            assert!(addr.is_none_or(|a| !a.is_unspecified()));
            assert_eq!(
                fuzzing::split_target(&shown(addr, port)),
                Some((addr, port))
            );
        }
    }

    // The port the seeds' listings use.
    let port = 1090;
    for (addr, v4, v6) in fuzzing::ss_local_addrs(text, port) {
        assert!(!addr.contains('%'));
        // A wildcard of one family never serves the other; only `*` both.
        if v4 && v6 {
            assert_eq!(addr, "*");
        }
    }
    let _ = fuzzing::proc_net_binds(text, true, port);
    let _ = fuzzing::proc_net_binds(text, false, port);
});
