//! Identifiers and clocks: OS randomness, UUID v4, workspace tokens (43-char URL-safe
//! base64), wall-clock microseconds and RFC 3339 formatting/parsing (no crates).

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{BufReader, Read};
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static URANDOM: RefCell<Option<BufReader<File>>> = RefCell::new(
        File::open("/dev/urandom").ok().map(|f| BufReader::with_capacity(4096, f)),
    );
    static FALLBACK: Cell<u64> = const { Cell::new(0) };
}

/// Fill `buf` from `/dev/urandom` (buffered per thread). If the device is unreadable,
/// fall back to a splitmix64 stream seeded from the clock: ids stay distinct.
pub fn fill_random(buf: &mut [u8]) {
    let ok = URANDOM.with(|r| match r.borrow_mut().as_mut() {
        Some(f) => f.read_exact(buf).is_ok(),
        None => false,
    });
    if ok {
        return;
    }
    FALLBACK.with(|state| {
        let mut s = state.get();
        if s == 0 {
            s = (now_us() as u64) ^ 0x9e37_79b9_7f4a_7c15 ^ (buf.as_ptr() as u64);
        }
        for chunk in buf.chunks_mut(8) {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let bytes = z.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        state.set(s);
    });
}

/// A fresh random (version 4) UUID, lower-case canonical form.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    fill_random(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Is `s` a UUID in the canonical 8-4-4-4-12 hex form (any case)?
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A workspace token: 32 random bytes as unpadded URL-safe base64 (43 characters).
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    fill_random(&mut b);
    base64url(&b)
}

fn base64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = match chunk.len() {
            3 => (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]),
            2 => (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8),
            _ => u32::from(chunk[0]) << 16,
        };
        let chars = chunk.len() + 1;
        for i in 0..chars {
            let idx = ((n >> (18 - 6 * i)) & 0x3f) as usize;
            out.push(char::from(ALPHABET[idx]));
        }
    }
    out
}

/// Wall-clock microseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    now_us() / 1000
}

pub use molecule::timestamp::{parse_rfc3339, rfc3339};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shape() {
        let u = new_uuid();
        assert!(is_uuid(&u), "{u}");
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(new_uuid(), u);
        assert!(!is_uuid("act-1"));
        assert!(!is_uuid("zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"));
    }

    #[test]
    fn token_shape() {
        let t = new_token();
        assert_eq!(t.len(), 43);
        assert!(
            t.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(base64url(b"\xfb\xff"), "-_8");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
    }
}
