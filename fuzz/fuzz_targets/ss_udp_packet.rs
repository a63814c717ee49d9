//! A shadowsocks UDP reply as it arrives from the server, through each
//! of the six methods: as sent (the checks before the tag) and sealed
//! with the server's key (the parsing after it: 2022's type, timestamp,
//! client session, padding length, the address). Besides never
//! panicking: a reply it accepts has its payload inside the datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tproxyd::fuzzing::ss_udp_reply(&data[..data.len().min(70_000)]);
});
