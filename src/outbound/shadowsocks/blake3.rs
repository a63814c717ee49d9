//! BLAKE3 `derive_key` for inputs of one chunk (at most 1024 bytes), which
//! is all shadowsocks 2022 needs: the session subkey is
//! `derive_key("shadowsocks 2022 session subkey", PSK ‖ salt)`, at most
//! 32 + 32 bytes. Written from the BLAKE3 specification (Aumasson, Neves,
//! O'Connor, Wilcox-O'Hearn, 2020) so the build needs no `blake3` crate,
//! whose build script pulls in `cc`. One chunk is one chaining value, so no
//! tree (parent nodes) is needed; a longer input is refused, not hashed
//! wrong.

/// Bytes in a block, the compression function's message.
const BLOCK_LEN: usize = 64;
/// Bytes in a chunk, the leaf of the tree; the most this module hashes.
pub const CHUNK_LEN: usize = 1024;
/// Bytes of a derived key.
pub const KEY_LEN: usize = 32;

/// The initial chaining value: SHA-256's IV (spec §2.2).
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];

/// The message word order applied between rounds (spec Table 2).
const MSG_PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];

// Domain flags (spec Table 3). PARENT and KEYED_HASH are not needed here.
const CHUNK_START: u32 = 1 << 0;
const CHUNK_END: u32 = 1 << 1;
const ROOT: u32 = 1 << 3;
const DERIVE_KEY_CONTEXT: u32 = 1 << 5;
const DERIVE_KEY_MATERIAL: u32 = 1 << 6;

/// A context or key material longer than the one chunk this module hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "BLAKE3 input of {len} bytes: this implementation hashes one chunk, at most {CHUNK_LEN} bytes"
)]
pub struct TooLong {
    pub len: usize,
}

/// The quarter-round mixing function G (spec §2.2).
#[inline(always)]
fn g(s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize, mx: u32, my: u32) {
    s[a] = s[a].wrapping_add(s[b]).wrapping_add(mx);
    s[d] = (s[d] ^ s[a]).rotate_right(16);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_right(12);
    s[a] = s[a].wrapping_add(s[b]).wrapping_add(my);
    s[d] = (s[d] ^ s[a]).rotate_right(8);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_right(7);
}

/// One round: G on the columns, then on the diagonals.
#[inline(always)]
fn round(s: &mut [u32; 16], m: &[u32; 16]) {
    g(s, 0, 4, 8, 12, m[0], m[1]);
    g(s, 1, 5, 9, 13, m[2], m[3]);
    g(s, 2, 6, 10, 14, m[4], m[5]);
    g(s, 3, 7, 11, 15, m[6], m[7]);
    g(s, 0, 5, 10, 15, m[8], m[9]);
    g(s, 1, 6, 11, 12, m[10], m[11]);
    g(s, 2, 7, 8, 13, m[12], m[13]);
    g(s, 3, 4, 9, 14, m[14], m[15]);
}

/// The compression function (spec §2.2): seven rounds over the chaining
/// value, the IV, the counter, the block length and the flags, with the
/// message words permuted between rounds. Returns all 16 output words:
/// the first 8 are the next chaining value, all 16 the root output block.
fn compress(
    cv: &[u32; 8],
    block: &[u8; BLOCK_LEN],
    counter: u64,
    block_len: u32,
    flags: u32,
) -> [u32; 16] {
    let mut m = [0u32; 16];
    for (w, bytes) in m.iter_mut().zip(block.chunks_exact(4)) {
        *w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    let mut s = [
        cv[0],
        cv[1],
        cv[2],
        cv[3],
        cv[4],
        cv[5],
        cv[6],
        cv[7],
        IV[0],
        IV[1],
        IV[2],
        IV[3],
        counter as u32,
        (counter >> 32) as u32,
        block_len,
        flags,
    ];
    for r in 0..7 {
        round(&mut s, &m);
        if r < 6 {
            let prev = m;
            for (w, &from) in m.iter_mut().zip(MSG_PERMUTATION.iter()) {
                *w = prev[from];
            }
        }
    }
    for i in 0..8 {
        s[i] ^= s[i + 8];
        s[i + 8] ^= cv[i];
    }
    s
}

/// The state of the one chunk being hashed: the chaining value so far and
/// the last block, kept back because only at the end is it known to be
/// the last (it takes CHUNK_END and ROOT).
struct Chunk {
    cv: [u32; 8],
    flags: u32,
    block: [u8; BLOCK_LEN],
    block_len: usize,
    blocks_compressed: usize,
    total: usize,
}

impl Chunk {
    fn new(key: [u32; 8], flags: u32) -> Chunk {
        Chunk {
            cv: key,
            flags,
            block: [0; BLOCK_LEN],
            block_len: 0,
            blocks_compressed: 0,
            total: 0,
        }
    }

    fn start_flag(&self) -> u32 {
        if self.blocks_compressed == 0 {
            CHUNK_START
        } else {
            0
        }
    }

    fn update(&mut self, mut input: &[u8]) -> Result<(), TooLong> {
        let total = self.total.saturating_add(input.len());
        if total > CHUNK_LEN {
            return Err(TooLong { len: total });
        }
        self.total = total;
        while !input.is_empty() {
            if self.block_len == BLOCK_LEN {
                // More input follows, so this full block is not the last.
                let out = compress(
                    &self.cv,
                    &self.block,
                    0,
                    BLOCK_LEN as u32,
                    self.flags | self.start_flag(),
                );
                self.cv.copy_from_slice(&out[..8]);
                self.blocks_compressed += 1;
                self.block = [0; BLOCK_LEN];
                self.block_len = 0;
            }
            let take = (BLOCK_LEN - self.block_len).min(input.len());
            let (now, rest) = input.split_at(take);
            self.block[self.block_len..self.block_len + take].copy_from_slice(now);
            self.block_len += take;
            input = rest;
        }
        Ok(())
    }

    /// The root output block: the last block (zero-padded, possibly
    /// empty) compressed with CHUNK_END and ROOT, counter 0. Up to 64
    /// bytes of output come from this one compression.
    fn root_output(&self) -> [u8; 2 * KEY_LEN] {
        let flags = self.flags | self.start_flag() | CHUNK_END | ROOT;
        let words = compress(&self.cv, &self.block, 0, self.block_len as u32, flags);
        let mut out = [0u8; 2 * KEY_LEN];
        for (bytes, w) in out.chunks_exact_mut(4).zip(words.iter()) {
            bytes.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// BLAKE3 `derive_key(context, material)` (spec §2.6.3) with the material
/// given in pieces (hashed as their concatenation): the context is hashed
/// with DERIVE_KEY_CONTEXT, its 32 bytes key the hash of the material
/// with DERIVE_KEY_MATERIAL. Refuses a context or material over one chunk.
pub fn derive_key(context: &str, material: &[&[u8]]) -> Result<[u8; KEY_LEN], TooLong> {
    let mut ctx = Chunk::new(IV, DERIVE_KEY_CONTEXT);
    ctx.update(context.as_bytes())?;
    let context_key = ctx.root_output();
    let mut key = [0u32; 8];
    for (w, bytes) in key.iter_mut().zip(context_key.chunks_exact(4)) {
        *w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    let mut chunk = Chunk::new(key, DERIVE_KEY_MATERIAL);
    for piece in material {
        chunk.update(piece)?;
    }
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(&chunk.root_output()[..KEY_LEN]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The official BLAKE3 test vectors (test_vectors/test_vectors.json of
    /// the reference repository): input byte i is i % 251, derive_key with
    /// the vectors' context, the first 32 bytes of `derive_key`. Lengths
    /// cover an empty chunk, one partial block, block boundaries and a
    /// full chunk.
    #[test]
    fn official_derive_key_vectors() {
        const CONTEXT: &str = "BLAKE3 2019-12-27 16:29:52 test vectors context";
        const VECTORS: &[(usize, &str)] = &[
            (
                0,
                "2cc39783c223154fea8dfb7c1b1660f2ac2dcbd1c1de8277b0b0dd39b7e50d7d",
            ),
            (
                1,
                "b3e2e340a117a499c6cf2398a19ee0d29cca2bb7404c73063382693bf66cb06c",
            ),
            (
                63,
                "b6451e30b953c206e34644c6803724e9d2725e0893039cfc49584f991f451af3",
            ),
            (
                64,
                "a5c4a7053fa86b64746d4bb688d06ad1f02a18fce9afd3e818fefaa7126bf73e",
            ),
            (
                65,
                "51fd05c3c1cfbc8ed67d139ad76f5cf8236cd2acd26627a30c104dfd9d3ff8a8",
            ),
            (
                127,
                "c91c090ceee3a3ac81902da31838012625bbcd73fcb92e7d7e56f78deba4f0c3",
            ),
            (
                128,
                "81720f34452f58a0120a58b6b4608384b5c51d11f39ce97161a0c0e442ca0225",
            ),
            (
                129,
                "938d2d4435be30eafdbb2b7031f7857c98b04881227391dc40db3c7b21f41fc1",
            ),
            (
                1023,
                "74a16c1c3d44368a86e1ca6df64be6a2f64cce8f09220787450722d85725dea5",
            ),
            (
                1024,
                "7356cd7720d5b66b6d0697eb3177d9f8d73a4a5c5e968896eb6a689684302706",
            ),
        ];
        let input = |n: usize| (0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>();
        for &(len, want) in VECTORS {
            let got = derive_key(CONTEXT, &[&input(len)]).unwrap();
            assert_eq!(hex(&got), want, "input length {len}");
        }
        assert_eq!(VECTORS.len(), 10);
    }

    /// The material may come in any split: the same key as one piece.
    #[test]
    fn pieces_hash_as_their_concatenation() {
        let data = (0..300).map(|i| (i % 251) as u8).collect::<Vec<_>>();
        let whole = derive_key("ctx", &[&data]).unwrap();
        for cut in [0, 1, 32, 63, 64, 65, 128, 299, 300] {
            let (a, b) = data.split_at(cut);
            assert_eq!(derive_key("ctx", &[a, b]).unwrap(), whole, "cut at {cut}");
        }
        assert_eq!(
            derive_key("ctx", &[&data[..100], &[], &data[100..]]).unwrap(),
            whole
        );
    }

    #[test]
    fn more_than_one_chunk_is_refused() {
        let big = vec![0u8; CHUNK_LEN + 1];
        assert_eq!(
            derive_key("ctx", &[&big]),
            Err(TooLong { len: CHUNK_LEN + 1 })
        );
        assert_eq!(
            derive_key("ctx", &[&big[..600], &big[..600]]),
            Err(TooLong { len: 1200 })
        );
        let long_context = "x".repeat(CHUNK_LEN + 1);
        assert!(derive_key(&long_context, &[b"k"]).is_err());
        assert!(derive_key("ctx", &[&big[..CHUNK_LEN]]).is_ok());
    }
}
