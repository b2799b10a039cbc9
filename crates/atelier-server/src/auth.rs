//! API tokens: random 32-byte secrets shown once, stored as SHA-256 hashes.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix that makes tokens recognisable (and greppable by secret scanners).
pub const TOKEN_PREFIX: &str = "atl_";

/// A new random token.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// Hex SHA-256 of a token, as stored.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Compares two equal-length hex strings without an early exit.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_hash_stably() {
        let a = generate_token();
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == 4 + 64);
        assert_ne!(a, generate_token());
        assert_eq!(hash_token(&a), hash_token(&a));
        assert!(constant_time_eq(&hash_token(&a), &hash_token(&a)));
        assert!(!constant_time_eq(&hash_token(&a), &hash_token("x")));
    }
}
