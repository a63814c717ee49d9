//! Rule-set files as they come from the internet: cidr and domain lists
//! (dnsmasq lines included) and v2ray geoip.dat/geosite.dat. The first
//! byte picks the format and the category; a file is either refused with
//! a message naming where, or read into prefixes that print and re-parse
//! to themselves.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxyd::config::RuleSetFormat;
use tproxyd::cidr::Cidr;
use tproxyd::policy::rule_set::RuleSet;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let format = match pick & 3 {
        0 => RuleSetFormat::Cidr,
        1 => RuleSetFormat::Domains,
        2 => RuleSetFormat::Geoip,
        _ => RuleSetFormat::Geosite,
    };
    let category = if pick & 4 != 0 { "cn" } else { "CN" };
    match RuleSet::parse(format, "fuzz.txt", bytes, category) {
        Ok(RuleSet::Prefixes(list)) => {
            for c in list {
                let text = c.to_string();
                assert_eq!(text.parse::<Cidr>(), Ok(c), "{text}");
            }
        }
        Ok(RuleSet::Domains(_)) => {}
        Err(message) => assert!(message.contains("fuzz.txt"), "{message}"),
    }
});
