//! Shadowsocks' cryptography on RustCrypto primitives (pure Rust): the
//! methods, the master key from a password (AEAD) or a base64 PSK (2022),
//! the per-session subkey, the AEAD ciphers with detached tags, the
//! little-endian nonce counter and random salts from the OS.
//!
//! AES (and GHASH's carry-less multiply) pick AES-NI/CLMUL on x86_64 and
//! the ARMv8 crypto extensions on aarch64 at run time (`cpufeatures`),
//! falling back to constant-time software; see
//! `tests::the_aes_backend_is_chosen_at_run_time`.

use std::fmt;

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt};
use aes_gcm::aead::array::Array;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes128Gcm, Aes256Gcm};
use base64::Engine;
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use hkdf::Hkdf;
use md5::{Digest, Md5};
use sha1::Sha1;

use super::blake3;

/// Every method's authentication tag.
pub const TAG_LEN: usize = 16;
/// The longest key (and salt) of any method.
pub const MAX_KEY_LEN: usize = 32;
/// Nonces of the 12-byte AEADs.
pub const NONCE_LEN: usize = 12;
/// Nonces of XChaCha20-Poly1305 (2022 chacha UDP).
pub const XNONCE_LEN: usize = 24;

/// BLAKE3 `derive_key` context of a 2022 session subkey (SIP022 §2).
const SUBKEY_CONTEXT_2022: &str = "shadowsocks 2022 session subkey";
/// HKDF-SHA1 info of an AEAD session subkey (SIP004).
const SUBKEY_INFO: &[u8] = b"ss-subkey";

/// A shadowsocks method: the AEAD (SIP004) and 2022 (SIP022) ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20IetfPoly1305,
    Blake3Aes128Gcm,
    Blake3Aes256Gcm,
    Blake3Chacha20Poly1305,
}

/// Methods other clients know that tproxyd refuses on purpose: the
/// stream ciphers are broken (no integrity, replayable) and were
/// deprecated by shadowsocks itself; the extras are rare enough to leave
/// out.
const REFUSED: &[&str] = &[
    "rc4-md5",
    "aes-128-cfb",
    "aes-192-cfb",
    "aes-256-cfb",
    "aes-128-ctr",
    "aes-192-ctr",
    "aes-256-ctr",
    "camellia-128-cfb",
    "camellia-192-cfb",
    "camellia-256-cfb",
    "bf-cfb",
    "salsa20",
    "chacha20",
    "chacha20-ietf",
    "table",
];

impl Method {
    pub const ALL: [Method; 6] = [
        Method::Aes128Gcm,
        Method::Aes256Gcm,
        Method::Chacha20IetfPoly1305,
        Method::Blake3Aes128Gcm,
        Method::Blake3Aes256Gcm,
        Method::Blake3Chacha20Poly1305,
    ];

    /// Its name as configs and URLs write it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Aes128Gcm => "aes-128-gcm",
            Method::Aes256Gcm => "aes-256-gcm",
            Method::Chacha20IetfPoly1305 => "chacha20-ietf-poly1305",
            Method::Blake3Aes128Gcm => "2022-blake3-aes-128-gcm",
            Method::Blake3Aes256Gcm => "2022-blake3-aes-256-gcm",
            Method::Blake3Chacha20Poly1305 => "2022-blake3-chacha20-poly1305",
        }
    }

    /// The method named `name` (as written, case-insensitive).
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Why `name` is not a method, for the config's message: a stream
    /// cipher is named as such, anything else gets the list.
    pub fn unknown(name: &str) -> String {
        let lower = name.trim().to_ascii_lowercase();
        if REFUSED.contains(&lower.as_str()) {
            format!(
                "{name:?} is a shadowsocks stream cipher: deprecated and insecure (no integrity, \
                 replayable), so tproxyd does not speak it; configure the server with one of: {}",
                Method::names()
            )
        } else {
            format!(
                "unknown shadowsocks method {name:?}; one of: {}",
                Method::names()
            )
        }
    }

    /// The list of names, for messages.
    pub fn names() -> String {
        Method::ALL.map(Method::name).join(", ")
    }

    pub fn key_len(self) -> usize {
        match self {
            Method::Aes128Gcm | Method::Blake3Aes128Gcm => 16,
            _ => 32,
        }
    }

    /// Salts are as long as keys, in both families.
    pub fn salt_len(self) -> usize {
        self.key_len()
    }

    /// Shadowsocks 2022 (SIP022) rather than AEAD (SIP004).
    pub fn is_2022(self) -> bool {
        matches!(
            self,
            Method::Blake3Aes128Gcm | Method::Blake3Aes256Gcm | Method::Blake3Chacha20Poly1305
        )
    }

    /// The largest payload of one TCP chunk: 0x3FFF for AEAD (the top two
    /// bits of the length are reserved), 0xFFFF for 2022.
    pub fn max_chunk(self) -> usize {
        if self.is_2022() {
            0xFFFF
        } else {
            0x3FFF
        }
    }

    fn aead(self) -> Algorithm {
        match self {
            Method::Aes128Gcm | Method::Blake3Aes128Gcm => Algorithm::Aes128Gcm,
            Method::Aes256Gcm | Method::Blake3Aes256Gcm => Algorithm::Aes256Gcm,
            Method::Chacha20IetfPoly1305 | Method::Blake3Chacha20Poly1305 => Algorithm::ChaCha20,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy)]
enum Algorithm {
    Aes128Gcm,
    Aes256Gcm,
    ChaCha20,
}

/// Why a password is no key for its method.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the password is empty")]
    Empty,
    #[error(
        "{method} takes as password a key of {len} random bytes in base64, not a passphrase \
         (this one is not base64); make one with `openssl rand -base64 {len}`"
    )]
    NotBase64 { method: Method, len: usize },
    #[error(
        "{method} takes as password a key of exactly {len} bytes in base64, this one decodes \
         to {got} bytes; make one with `openssl rand -base64 {len}`"
    )]
    WrongLength {
        method: Method,
        len: usize,
        got: usize,
    },
}

/// A method's master key: from the password with EVP_BytesToKey (AEAD),
/// or the base64 PSK itself (2022). Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    method: Method,
    bytes: [u8; MAX_KEY_LEN],
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("method", &self.method)
            .field("bytes", &"<redacted>")
            .finish()
    }
}

/// A session subkey (as long as the method's key).
pub struct Subkey {
    bytes: [u8; MAX_KEY_LEN],
    len: usize,
}

impl Subkey {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Debug for Subkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subkey(<redacted>)")
    }
}

/// Standard base64, padded or not (SSR accepts both).
const BASE64_ANY_PAD: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

impl Key {
    /// The key `password` gives for `method`.
    pub fn new(method: Method, password: &str) -> Result<Key, KeyError> {
        // Errors never quote the password, not even one byte of it.
        if password.is_empty() {
            return Err(KeyError::Empty);
        }
        let len = method.key_len();
        let mut bytes = [0u8; MAX_KEY_LEN];
        if method.is_2022() {
            let decoded = BASE64_ANY_PAD
                .decode(password.trim())
                .map_err(|_| KeyError::NotBase64 { method, len })?;
            if decoded.len() != len {
                return Err(KeyError::WrongLength {
                    method,
                    len,
                    got: decoded.len(),
                });
            }
            bytes[..len].copy_from_slice(&decoded);
        } else {
            evp_bytes_to_key(password.as_bytes(), &mut bytes[..len]);
        }
        Ok(Key { method, bytes })
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// A key no server has (all zero), for settings that failed
    /// validation and are never built.
    pub fn unusable() -> Key {
        Key {
            method: Method::Aes128Gcm,
            bytes: [0; MAX_KEY_LEN],
        }
    }

    /// The key itself (the PSK for 2022).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.method.key_len()]
    }

    /// The subkey of the session that `salt` opens: HKDF-SHA1 (AEAD) or
    /// BLAKE3 `derive_key` over key ‖ salt (2022; for 2022 UDP the
    /// "salt" is the session id, u64 big-endian).
    pub fn subkey(&self, salt: &[u8]) -> Subkey {
        let len = self.method.key_len();
        let mut bytes = [0u8; MAX_KEY_LEN];
        if self.method.is_2022() {
            // Key and salt are at most 32 bytes each (the salt is a
            // method's salt or an 8-byte session id), far below BLAKE3's
            // one chunk of 1024 that `derive_key` takes.
            match blake3::derive_key(SUBKEY_CONTEXT_2022, &[self.as_bytes(), salt]) {
                Ok(subkey) => bytes = subkey,
                Err(e) => unreachable!("2022 subkey: {e}"),
            }
        } else {
            let hkdf = Hkdf::<Sha1>::new(Some(salt), self.as_bytes());
            // L ≤ 32 is far below HKDF-SHA1's limit of 255 × 20.
            if hkdf.expand(SUBKEY_INFO, &mut bytes[..len]).is_err() {
                unreachable!("HKDF-SHA1 refused {len} bytes");
            }
        }
        Subkey { bytes, len }
    }

    /// The cipher of the session that `salt` opens.
    pub fn session(&self, salt: &[u8]) -> Cipher {
        Cipher::new(self.method, self.subkey(salt).as_bytes())
    }

    /// 2022 AES UDP: the block cipher of the separate header, keyed with
    /// the PSK itself. None for the other methods.
    pub fn header_cipher(&self) -> Option<HeaderCipher> {
        if !self.method.is_2022() {
            return None;
        }
        match self.method.aead() {
            Algorithm::Aes128Gcm => Some(HeaderCipher::Aes128(Box::new(
                aes::Aes128::new_from_slice(self.as_bytes()).ok()?,
            ))),
            Algorithm::Aes256Gcm => Some(HeaderCipher::Aes256(Box::new(
                aes::Aes256::new_from_slice(self.as_bytes()).ok()?,
            ))),
            Algorithm::ChaCha20 => None,
        }
    }

    /// 2022 chacha UDP: XChaCha20-Poly1305 keyed with the PSK itself.
    /// None for the other methods.
    pub fn xchacha(&self) -> Option<XCipher> {
        if self.method != Method::Blake3Chacha20Poly1305 {
            return None;
        }
        XChaCha20Poly1305::new_from_slice(self.as_bytes())
            .ok()
            .map(|c| XCipher(Box::new(c)))
    }
}

/// OpenSSL's EVP_BytesToKey with MD5, no salt, one round: D1 = MD5(pw),
/// Di = MD5(Di-1 ‖ pw), key = D1 ‖ D2 ‖ … cut to its length.
fn evp_bytes_to_key(password: &[u8], key: &mut [u8]) {
    let mut last: Option<[u8; 16]> = None;
    for piece in key.chunks_mut(16) {
        let mut md5 = Md5::new();
        if let Some(prev) = &last {
            md5.update(prev);
        }
        md5.update(password);
        let digest: [u8; 16] = md5.finalize().into();
        piece.copy_from_slice(&digest[..piece.len()]);
        last = Some(digest);
    }
}

/// A tag that did not verify: the peer has another key, or the bytes were
/// changed on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication tag did not verify")]
pub struct BadTag;

/// One direction's AEAD with its session subkey; seals and opens in
/// place with a detached tag.
#[derive(Clone)]
pub enum Cipher {
    Aes128Gcm(Box<Aes128Gcm>),
    Aes256Gcm(Box<Aes256Gcm>),
    ChaCha20Poly1305(Box<ChaCha20Poly1305>),
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cipher::Aes128Gcm(_) => "Cipher(AES-128-GCM)",
            Cipher::Aes256Gcm(_) => "Cipher(AES-256-GCM)",
            Cipher::ChaCha20Poly1305(_) => "Cipher(ChaCha20-Poly1305)",
        })
    }
}

impl Cipher {
    /// `method`'s AEAD keyed with `key` (its key length; a subkey).
    pub fn new(method: Method, key: &[u8]) -> Cipher {
        let key = &key[..method.key_len().min(key.len())];
        // The lengths come from `method`, never from the network.
        match method.aead() {
            Algorithm::Aes128Gcm => Cipher::Aes128Gcm(Box::new(
                Aes128Gcm::new_from_slice(key).unwrap_or_else(|_| unreachable!("16-byte key")),
            )),
            Algorithm::Aes256Gcm => Cipher::Aes256Gcm(Box::new(
                Aes256Gcm::new_from_slice(key).unwrap_or_else(|_| unreachable!("32-byte key")),
            )),
            Algorithm::ChaCha20 => Cipher::ChaCha20Poly1305(Box::new(
                ChaCha20Poly1305::new_from_slice(key)
                    .unwrap_or_else(|_| unreachable!("32-byte key")),
            )),
        }
    }

    /// Encrypts `msg` in place; returns its tag.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], msg: &mut [u8]) -> [u8; TAG_LEN] {
        let nonce = Array::from(*nonce);
        let tag = match self {
            Cipher::Aes128Gcm(c) => c.encrypt_inout_detached(&nonce, &[], msg.into()),
            Cipher::Aes256Gcm(c) => c.encrypt_inout_detached(&nonce, &[], msg.into()),
            Cipher::ChaCha20Poly1305(c) => c.encrypt_inout_detached(&nonce, &[], msg.into()),
        };
        // Only messages over 64 GiB (GCM) / 256 GiB (ChaCha) are refused.
        tag.map(Into::into)
            .unwrap_or_else(|_| unreachable!("AEAD message too long"))
    }

    /// Decrypts `msg` in place if `tag` verifies (else `msg` is garbage).
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        msg: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), BadTag> {
        let nonce = Array::from(*nonce);
        let tag = Array::from(*tag);
        match self {
            Cipher::Aes128Gcm(c) => c.decrypt_inout_detached(&nonce, &[], msg.into(), &tag),
            Cipher::Aes256Gcm(c) => c.decrypt_inout_detached(&nonce, &[], msg.into(), &tag),
            Cipher::ChaCha20Poly1305(c) => c.decrypt_inout_detached(&nonce, &[], msg.into(), &tag),
        }
        .map_err(|_| BadTag)
    }

    /// Seals `buf[..len - 16]` and writes the tag into its last 16 bytes.
    /// `buf` shorter than a tag is left alone.
    pub fn seal_tail(&self, nonce: &[u8; NONCE_LEN], buf: &mut [u8]) {
        let Some(msg_len) = buf.len().checked_sub(TAG_LEN) else {
            return;
        };
        let (msg, tag) = buf.split_at_mut(msg_len);
        tag.copy_from_slice(&self.seal(nonce, msg));
    }

    /// Opens `buf` = ciphertext ‖ tag in place; the plaintext is
    /// `buf[..len - 16]`.
    pub fn open_tail(&self, nonce: &[u8; NONCE_LEN], buf: &mut [u8]) -> Result<(), BadTag> {
        let msg_len = buf.len().checked_sub(TAG_LEN).ok_or(BadTag)?;
        let (msg, tag) = buf.split_at_mut(msg_len);
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| BadTag)?;
        self.open(nonce, msg, &tag)
    }
}

/// XChaCha20-Poly1305 (2022-blake3-chacha20-poly1305 UDP), by a 24-byte
/// nonce.
#[derive(Clone)]
pub struct XCipher(Box<XChaCha20Poly1305>);

impl fmt::Debug for XCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XCipher(XChaCha20-Poly1305)")
    }
}

impl XCipher {
    /// Encrypts `msg` in place; returns its tag.
    pub fn seal(&self, nonce: &[u8; XNONCE_LEN], msg: &mut [u8]) -> [u8; TAG_LEN] {
        self.0
            .encrypt_inout_detached(&Array::from(*nonce), &[], msg.into())
            .map(Into::into)
            .unwrap_or_else(|_| unreachable!("AEAD message too long"))
    }

    /// Decrypts `msg` in place if `tag` verifies.
    pub fn open(
        &self,
        nonce: &[u8; XNONCE_LEN],
        msg: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), BadTag> {
        self.0
            .decrypt_inout_detached(&Array::from(*nonce), &[], msg.into(), &Array::from(*tag))
            .map_err(|_| BadTag)
    }
}

/// AES of one block with the PSK: the 2022 UDP separate header.
#[derive(Clone)]
pub enum HeaderCipher {
    Aes128(Box<aes::Aes128>),
    Aes256(Box<aes::Aes256>),
}

impl fmt::Debug for HeaderCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeaderCipher(<redacted>)")
    }
}

impl HeaderCipher {
    pub fn encrypt(&self, block: &mut [u8; 16]) {
        let mut b = aes::Block::from(*block);
        match self {
            HeaderCipher::Aes128(c) => c.encrypt_block(&mut b),
            HeaderCipher::Aes256(c) => c.encrypt_block(&mut b),
        }
        *block = b.into();
    }

    pub fn decrypt(&self, block: &mut [u8; 16]) {
        let mut b = aes::Block::from(*block);
        match self {
            HeaderCipher::Aes128(c) => c.decrypt_block(&mut b),
            HeaderCipher::Aes256(c) => c.decrypt_block(&mut b),
        }
        *block = b.into();
    }
}

/// The 12-byte little-endian nonce counter of a TCP direction: starts at
/// 0, goes up by one per seal or open, wraps over all 96 bits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NonceCounter([u8; NONCE_LEN]);

impl NonceCounter {
    /// The nonce to use now; the counter moves on.
    pub fn take(&mut self) -> [u8; NONCE_LEN] {
        let now = self.0;
        for byte in &mut self.0 {
            let (v, carry) = byte.overflowing_add(1);
            *byte = v;
            if !carry {
                break;
            }
        }
        now
    }
}

/// Fills `salt` from the OS random source, drawing again if it came out
/// all zero (as shadowsocks-crypto does).
pub fn random_salt(salt: &mut [u8]) -> std::io::Result<()> {
    loop {
        fill_random(salt)?;
        if salt.iter().any(|b| *b != 0) || salt.is_empty() {
            return Ok(());
        }
    }
}

/// Fills `buf` from the OS random source.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    getrandom::fill(buf)
        .map_err(|e| std::io::Error::other(format!("the OS random source failed: {e}")))
}

/// A key for `m`, for tests and the fuzz targets: a passphrase for AEAD,
/// a base64 PSK of sevens for 2022.
#[cfg(any(test, feature = "fuzzing"))]
pub fn example_key(m: Method) -> Key {
    let password = if m.is_2022() {
        base64::engine::general_purpose::STANDARD.encode(vec![7u8; m.key_len()])
    } else {
        "a passphrase".to_string()
    };
    match Key::new(m, &password) {
        Ok(k) => k,
        Err(e) => unreachable!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn test_key(m: Method) -> Key {
        example_key(m)
    }

    fn counting(n: u8) -> Vec<u8> {
        (0..n).collect()
    }

    #[test]
    fn names_round_trip_and_typos_name_the_list() {
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.name()), Some(m));
            assert_eq!(m.salt_len(), m.key_len());
        }
        assert_eq!(Method::from_name("AES-128-GCM"), Some(Method::Aes128Gcm));
        assert_eq!(Method::from_name("aes-128-gcn"), None);
        let e = Method::unknown("aes-128-gcn");
        assert!(e.contains("aes-128-gcm, aes-256-gcm, chacha20-ietf-poly1305, 2022-blake3-aes-128-gcm, 2022-blake3-aes-256-gcm, 2022-blake3-chacha20-poly1305"), "{e}");
        let e = Method::unknown("rc4-md5");
        assert!(e.contains("stream cipher"), "{e}");
        assert_eq!(Method::Aes128Gcm.max_chunk(), 0x3FFF);
        assert_eq!(Method::Blake3Aes128Gcm.max_chunk(), 0xFFFF);
    }

    /// SHADOWSOCKS.md §7, checked there against ss-server.
    #[test]
    fn evp_bytes_to_key_known_answers() {
        let k = Key::new(Method::Aes128Gcm, "test").unwrap();
        assert_eq!(hex(k.as_bytes()), "098f6bcd4621d373cade4e832627b4f6");
        let k = Key::new(Method::Aes256Gcm, "test").unwrap();
        assert_eq!(
            hex(k.as_bytes()),
            "098f6bcd4621d373cade4e832627b4f60a9172716ae6428409885b8b829ccb05"
        );
        let c = Key::new(Method::Chacha20IetfPoly1305, "test").unwrap();
        assert_eq!(c.as_bytes(), k.as_bytes());
    }

    #[test]
    fn hkdf_sha1_subkey_known_answers() {
        let k = Key::new(Method::Aes128Gcm, "test").unwrap();
        assert_eq!(
            hex(k.subkey(&counting(16)).as_bytes()),
            "96b249baa3b4e00f502f84a5a90ac784"
        );
        let k = Key::new(Method::Aes256Gcm, "test").unwrap();
        assert_eq!(
            hex(k.subkey(&counting(32)).as_bytes()),
            "0205fa486aabee35ab86fc1fa015f3a9fc5c8ce7657db427d9ba55b49e718953"
        );
    }

    #[test]
    fn aes_128_gcm_first_chunk_known_answer() {
        let k = Key::new(Method::Aes128Gcm, "test").unwrap();
        let cipher = k.session(&counting(16));
        let mut nonce = NonceCounter::default();
        let mut len = [0u8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cipher.seal_tail(&nonce.take(), &mut len);
        assert_eq!(hex(&len), "c45b9f24bbb3fee528965380e86735a18c6a");
        let mut payload = [0u8; 7 + TAG_LEN];
        payload[..7].copy_from_slice(&[1, 127, 0, 0, 1, 0, 80]);
        cipher.seal_tail(&nonce.take(), &mut payload);
        assert_eq!(
            hex(&payload),
            "65038d0e2c70c5e00a0ebb806d4c25fb5165ec926aa74d"
        );
        // And back, with a fresh counter for the reading side.
        let mut nonce = NonceCounter::default();
        cipher.open_tail(&nonce.take(), &mut len).unwrap();
        assert_eq!(&len[..2], &[0, 7]);
        cipher.open_tail(&nonce.take(), &mut payload).unwrap();
        assert_eq!(&payload[..7], &[1, 127, 0, 0, 1, 0, 80]);
    }

    #[test]
    fn chacha20_first_length_chunk_known_answer() {
        let k = Key::new(Method::Chacha20IetfPoly1305, "test").unwrap();
        let cipher = k.session(&counting(32));
        let mut len = [0u8; 2 + TAG_LEN];
        len[1] = 7;
        cipher.seal_tail(&[0; 12], &mut len);
        assert_eq!(hex(&len), "94a4a13678a8bea9a5a737d8f30eb7605ee4");
    }

    #[test]
    fn a_changed_byte_or_a_wrong_nonce_fails_the_tag() {
        for m in Method::ALL {
            let key = test_key(m);
            let cipher = key.session(&counting(m.salt_len() as u8));
            let mut buf = *b"hello, world.....0123456789abcdef";
            cipher.seal_tail(&[0; 12], &mut buf);
            let sealed = buf;
            assert!(cipher.open_tail(&[1; 12], &mut buf).is_err(), "{m}");
            buf = sealed;
            buf[3] ^= 1;
            assert_eq!(cipher.open_tail(&[0; 12], &mut buf), Err(BadTag), "{m}");
            buf = sealed;
            cipher.open_tail(&[0; 12], &mut buf).unwrap();
            assert_eq!(&buf[..17], b"hello, world.....");
        }
        let c = Key::new(Method::Aes128Gcm, "x").unwrap().session(&[0; 16]);
        assert_eq!(c.open_tail(&[0; 12], &mut [0u8; 15]), Err(BadTag));
    }

    #[test]
    fn the_nonce_counts_up_little_endian_and_wraps() {
        let mut n = NonceCounter::default();
        assert_eq!(n.take(), [0; 12]);
        assert_eq!(n.take()[0], 1);
        let mut n = NonceCounter([0xff, 0xff, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        n.take();
        assert_eq!(n.take(), [0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut n = NonceCounter([0xff; 12]);
        n.take();
        assert_eq!(n.take(), [0; 12]);
    }

    /// 2022 keys: base64 of exactly the key length, padded or not; the
    /// error names the length and how to make one.
    #[test]
    fn psk_2022_must_be_base64_of_the_key_length() {
        let k32 = "YctPZ6U7xPPcU+gp3u+0tx/tRizJN9K8y+uKlW2qjlI=";
        let k = Key::new(Method::Blake3Aes256Gcm, k32).unwrap();
        assert_eq!(k.as_bytes().len(), 32);
        let unpadded = Key::new(Method::Blake3Aes256Gcm, k32.trim_end_matches('=')).unwrap();
        assert_eq!(unpadded, k);
        let e = Key::new(Method::Blake3Aes128Gcm, k32).unwrap_err();
        assert_eq!(
            e.to_string(),
            "2022-blake3-aes-128-gcm takes as password a key of exactly 16 bytes in base64, this \
             one decodes to 32 bytes; make one with `openssl rand -base64 16`"
        );
        let e = Key::new(Method::Blake3Chacha20Poly1305, "correct horse").unwrap_err();
        assert!(e.to_string().contains("`openssl rand -base64 32`"), "{e}");
        assert_eq!(Key::new(Method::Aes128Gcm, ""), Err(KeyError::Empty));
        assert!(!format!("{k:?}").contains("YctP"));
        assert!(format!("{k:?}").contains("redacted"));
    }

    /// The 2022 session subkey: BLAKE3 derive_key over PSK ‖ salt, cut to
    /// the key length. The values were computed with the `blake3` crate
    /// (1.8.7) before our own BLAKE3 (blake3.rs, tested there against the
    /// official vectors) replaced it; ssserver agrees (tests/e2e_shadowsocks).
    #[test]
    fn subkey_2022_known_answers() {
        let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
        let key = Key::new(Method::Blake3Aes128Gcm, &b64(&[0x11; 16])).unwrap();
        assert_eq!(
            hex(key.subkey(&[0x22; 16]).as_bytes()),
            "5f5af8d1711a0cf862c59d7ebe86365f"
        );
        let key = Key::new(Method::Blake3Aes256Gcm, &b64(&[0x33; 32])).unwrap();
        assert_eq!(
            hex(key.subkey(&[0x44; 32]).as_bytes()),
            "450728c594b8febea295efc2d6a2a90048c6f07375bec586658cb4af776eb2d2"
        );
        // 2022 UDP: the "salt" is the session id, u64 big-endian.
        let key = Key::new(Method::Blake3Chacha20Poly1305, &b64(&[0x33; 32])).unwrap();
        assert_eq!(
            hex(key.subkey(&7u64.to_be_bytes()).as_bytes()),
            "898a2065829a97f54085645e8b4d17a6467da59d1967468e85897e7ca768d550"
        );
    }

    #[test]
    fn xchacha_and_the_header_cipher_round_trip() {
        let b64 = |n| base64::engine::general_purpose::STANDARD.encode(vec![9u8; n]);
        let key = Key::new(Method::Blake3Chacha20Poly1305, &b64(32)).unwrap();
        assert!(key.header_cipher().is_none());
        let x = key.xchacha().unwrap();
        let mut msg = *b"ping";
        let tag = x.seal(&[3; 24], &mut msg);
        assert_ne!(&msg, b"ping");
        x.open(&[3; 24], &mut msg, &tag).unwrap();
        assert_eq!(&msg, b"ping");
        for (m, n) in [(Method::Blake3Aes128Gcm, 16), (Method::Blake3Aes256Gcm, 32)] {
            let key = Key::new(m, &b64(n)).unwrap();
            assert!(key.xchacha().is_none());
            let h = key.header_cipher().unwrap();
            let mut block = [5u8; 16];
            h.encrypt(&mut block);
            assert_ne!(block, [5u8; 16]);
            h.decrypt(&mut block);
            assert_eq!(block, [5u8; 16]);
        }
        assert!(Key::new(Method::Aes128Gcm, "x")
            .unwrap()
            .header_cipher()
            .is_none());
    }

    #[test]
    fn salts_are_random_and_never_all_zero() {
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        random_salt(&mut a).unwrap();
        random_salt(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0; 32]);
    }

    /// The AES and GHASH/POLYVAL crates choose their backend at run time
    /// with `cpufeatures` (AES-NI + PCLMULQDQ on x86_64, the ARMv8 AES and
    /// PMULL instructions on aarch64); nothing needs enabling at build
    /// time. This checks the same detection they run agrees with the CPU
    /// flags the kernel reports, so a machine with AES-NI gets it.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn the_aes_backend_is_chosen_at_run_time() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or_default();
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        assert_eq!(
            std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq"),
            has("aes") && has("pclmulqdq")
        );
    }
}
