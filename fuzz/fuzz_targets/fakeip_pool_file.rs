//! The fake-ip pool file as tproxyd finds it at start: anything, since a
//! disk, a crash or a person may have written it. The loader either
//! refuses it (the pool stays as it was) or takes a mapping whose every
//! address is in the ranges, every name a host name, none twice; what it
//! took writes back to the same bytes. The first byte's low bit seals the
//! rest with a valid checksum, so the fuzzer reaches the entries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxyd::config::FakeIp;
use tproxyd::dns::fakeip::{seal, FakePool};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let ranges = if pick & 2 == 0 {
        vec!["198.18.0.0/15".parse().unwrap(), "fc00::/18".parse().unwrap()]
    } else {
        vec!["192.0.2.0/24".parse().unwrap()]
    };
    let cfg = FakeIp {
        ranges,
        exclude_domain: Vec::new(),
        exclude_domain_suffix: Vec::new(),
        exclude_rule_set: Vec::new(),
        default_exclude: false,
        ttl: 1,
        store: None,
        save_interval: 300,
    };
    let pool = FakePool::new(&cfg);
    let bytes = if pick & 1 == 1 {
        seal(rest.to_vec())
    } else {
        rest.to_vec()
    };
    let empty = pool.to_bytes();
    match pool.load_bytes(&bytes) {
        Ok(n) => {
            assert_eq!(n, pool.len());
            assert!(n <= pool.capacity());
            assert_eq!(pool.to_bytes(), bytes, "a loaded file writes back as it was");
        }
        Err(_) => assert_eq!(pool.to_bytes(), empty, "a refused file changed the pool"),
    }
});
