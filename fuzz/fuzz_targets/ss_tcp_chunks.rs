//! The shadowsocks TCP client's reply decoder (every method): replies
//! sealed from the input's chunk sizes and lengths, with a byte flipped
//! or the stream cut where the input says, fed in reads of the input's
//! sizes. Every outcome is data or a typed error; no panic, and no
//! allocation from a length the "server" sent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tproxyd::fuzzing::ss_tcp_reply(data);
});
