//! UUID helpers: validation of ids before they go into a URL, random v4 ids for
//! fresh messages, and name-based v5 ids for replies that must be the same after a
//! restart. No I/O beyond reading the OS random source; no clocks.

use std::fs::File;
use std::io::Read;
use std::sync::OnceLock;

/// Is `s` a UUID in the canonical 8-4-4-4-12 hex form (any case)?
///
/// Everything we put into a URL path or a cursor passes through here: the platform
/// answers a non-UUID with a 500 rather than a 400 (§API-1.7).
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 36 {
        return false;
    }
    b.iter().enumerate().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => *c == b'-',
        _ => c.is_ascii_hexdigit(),
    })
}

/// A workspace id known to be a UUID, in one spelling: trimmed and lower-case, as
/// the platform writes ids (§API-1.7: Postgres reads either case). File names, the
/// lock, reply ids and comparisons then cannot tell `ABC…` and `abc…` apart, and
/// whoever holds one need not check it again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct WorkspaceId(String);

impl WorkspaceId {
    /// `raw` trimmed and lower-cased, if that is a UUID.
    pub fn parse(raw: &str) -> Option<Self> {
        let id = raw.trim().to_ascii_lowercase();
        is_uuid(&id).then_some(Self(id))
    }

    /// An id in platform data (a row's source, a peer in a list), taken as it
    /// stands: a UUID without trimming, lower-cased. Only a person's input is trimmed.
    pub fn exact(raw: &str) -> Option<Self> {
        is_uuid(raw).then(|| Self(raw.to_ascii_lowercase()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for WorkspaceId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<&str> for WorkspaceId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A fresh random (version 4) UUID.
pub fn new_v4() -> String {
    let mut bytes = random_bytes::<16>();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    format_uuid(&bytes)
}

/// A name-based (version 5, SHA-1) UUID: the same namespace and name always give the
/// same id. `namespace` must be a UUID; if it is not, its bytes are hashed as they are.
pub fn v5(namespace: &str, name: &str) -> String {
    let mut input = parse_uuid(namespace)
        .map(|b| b.to_vec())
        .unwrap_or_else(|| namespace.as_bytes().to_vec());
    input.extend_from_slice(name.as_bytes());
    let digest = sha1(&input);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    format_uuid(&bytes)
}

/// `N` bytes from the OS random source. Falls back to a clock- and address-seeded
/// mix when `/dev/urandom` is unreadable (a broken chroot), which still gives ids
/// that differ between calls and processes.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    static URANDOM: RandomSource<'static> = RandomSource::new("/dev/urandom");
    let mut out = [0u8; N];
    if !URANDOM.fill(&mut out) {
        let mut seed = fallback_seed();
        for byte in out.iter_mut() {
            seed = splitmix64(seed);
            *byte = (seed >> 56) as u8;
        }
    }
    out
}

/// A random device kept open once opened: a fresh id per reply would otherwise cost
/// an open and a close too. Only a success is kept: an open that failed (a container
/// whose `/dev` is not mounted yet) is tried again on the next call, so an early
/// failure does not leave every later id on the fallback.
struct RandomSource<'a> {
    path: &'a str,
    file: OnceLock<File>,
}

impl<'a> RandomSource<'a> {
    const fn new(path: &'a str) -> Self {
        RandomSource {
            path,
            file: OnceLock::new(),
        }
    }

    /// Fills `out` from the device; `false` if it cannot be opened or read.
    fn fill(&self, out: &mut [u8]) -> bool {
        let file = match self.file.get() {
            Some(f) => f,
            None => match File::open(self.path) {
                // Two threads may both open it; one file is kept, the other closed.
                Ok(f) => self.file.get_or_init(|| f),
                Err(_) => return false,
            },
        };
        (&*file).read_exact(out).is_ok()
    }
}

/// A random `u64`, for jitter seeds.
pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes::<8>())
}

fn fallback_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let local = 0u8;
    let addr = &local as *const u8 as u64;
    nanos
        ^ addr.rotate_left(32)
        ^ u64::from(std::process::id())
        ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// One step of SplitMix64: a tiny, well-mixed generator for jitter.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    if !is_uuid(s) {
        return None;
    }
    let hex: Vec<u8> = s.bytes().filter(|c| *c != b'-').collect();
    let mut out = [0u8; 16];
    // is_uuid guarantees 32 hex digits, so 16 pairs.
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
    }
    Some(out)
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

fn format_uuid(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(HEX[usize::from(byte >> 4)]));
        s.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    s
}

/// SHA-1 (FIPS 180-4). Only used to derive v5 UUIDs, never for security.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let temp = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = temp;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, v) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha1_known_vectors() {
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        let long = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        assert_eq!(hex(&sha1(long)), "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
    }

    #[test]
    fn v5_matches_rfc_example() {
        // RFC 9562 appendix A.4: DNS namespace, "www.example.com".
        assert_eq!(
            v5("6ba7b810-9dad-11d1-80b4-00c04fd430c8", "www.example.com"),
            "2ed6657d-e927-568b-95e1-2665a8aea6a2"
        );
    }

    #[test]
    fn v5_is_stable_and_distinct() {
        let ns = "11111111-2222-3333-4444-555555555555";
        assert_eq!(v5(ns, "a"), v5(ns, "a"));
        assert_ne!(v5(ns, "a"), v5(ns, "b"));
        assert!(is_uuid(&v5(ns, "a")));
    }

    #[test]
    fn a_random_source_that_failed_to_open_is_opened_later() {
        let dir = std::env::temp_dir().join(format!("molecule-uuid-{}", new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("urandom");
        let source = RandomSource::new(path.to_str().unwrap());
        let mut out = [0u8; 4];
        assert!(!source.fill(&mut out), "no device yet");
        std::fs::write(&path, [1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert!(source.fill(&mut out), "the device appeared: opened now");
        assert_eq!(out, [1, 2, 3, 4]);
        // Kept open: the next read goes on where the last one ended.
        std::fs::remove_file(&path).unwrap();
        assert!(source.fill(&mut out));
        assert_eq!(out, [5, 6, 7, 8]);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn v4_is_valid_and_random() {
        let a = new_v4();
        let b = new_v4();
        assert!(is_uuid(&a), "{a}");
        assert_ne!(a, b);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn validation() {
        assert!(is_uuid("6ba7b810-9dad-11d1-80b4-00c04fd430c8"));
        assert!(is_uuid("6BA7B810-9DAD-11D1-80B4-00C04FD430C8"));
        let id = WorkspaceId::parse(" 6BA7B810-9DAD-11D1-80B4-00C04FD430C8\n").unwrap();
        assert_eq!(id, "6ba7b810-9dad-11d1-80b4-00c04fd430c8");
        assert_eq!(
            WorkspaceId::parse("6ba7b810-9dad-11d1-80b4-00c04fd430c"),
            None
        );
        for bad in [
            "",
            "act-1",
            "6ba7b810-9dad-11d1-80b4-00c04fd430c",
            "6ba7b810-9dad-11d1-80b4-00c04fd430c8a",
            "6ba7b8109dad-11d1-80b4-00c04fd430c8-",
            "6ba7b810-9dad-11d1-80b4-00c04fd430cg",
            "../../admin/x-aaaa-bbbb-cccc-dddddddddd",
        ] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }
}
