//! A UDP flow's first datagrams, as the QUIC Initial sniffer sees them.
//!
//! Random bytes rarely pass AES-GCM's tag, so the first byte picks how
//! the rest is read: as raw datagrams (the header parser, header
//! protection and coalesced-packet walk against hostile bytes), or as
//! plaintext frames that the target seals into client Initials itself
//! (the frame walker, the CRYPTO reassembly and the ClientHello parser
//! behind a valid seal). Either way: no panic, any name reported is a
//! valid host name, and once answered the answer stays.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxyd::policy::sniff::quic::{seal_initial, QuicAnswer, QuicSniff, Version};
use tproxyd::hostname::is_host_name;
use tproxyd::policy::sniff::Sniffed;

const DCID: [u8; 8] = [0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07, 0x18];

/// Pieces of `bytes`, each behind a 2-byte length.
fn pieces(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let [a, b, rest @ ..] = bytes {
        let n = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
        out.push(&rest[..n]);
        bytes = &rest[n..];
        if out.len() >= 12 {
            break;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let datagrams: Vec<Vec<u8>> = if mode & 1 == 0 {
        pieces(rest).into_iter().map(<[u8]>::to_vec).collect()
    } else {
        let version = if mode & 2 == 0 {
            Version::V1
        } else {
            Version::V2
        };
        pieces(rest)
            .into_iter()
            .enumerate()
            .map(|(i, frames)| {
                let pn_len = usize::from(mode >> 2 & 3) + 1;
                seal_initial(
                    version,
                    &DCID,
                    b"",
                    i as u64 + u64::from(mode >> 4),
                    pn_len,
                    frames,
                    1200,
                )
            })
            .collect()
    };
    let mut sniff = QuicSniff::new();
    let mut answered: Option<QuicAnswer> = None;
    for d in &datagrams {
        let answer = sniff.push(d);
        if let QuicAnswer::Done(Some(Sniffed { host: Some(h), .. })) = &answer {
            assert!(is_host_name(h), "invalid host {h:?}");
        }
        if let Some(before) = &answered {
            assert_eq!(&answer, before, "an answer changed");
        } else if answer != QuicAnswer::NeedMore {
            answered = Some(answer);
        }
    }
});
