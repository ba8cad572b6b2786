//! Secrets the federation hands out: operator and tenant API tokens, and one-time join tokens
//! that carry the CA's fingerprint so a new worker can verify the coordinator on first contact.
//! Only hashes of secrets are ever stored.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of operator tokens.
pub const OPERATOR_PREFIX: &str = "sovra-op-";
/// Prefix of tenant tokens.
pub const TENANT_PREFIX: &str = "sovra-tn-";
/// Prefix of join tokens.
pub const JOIN_PREFIX: &str = "sovra-join.";

/// A malformed token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The text is not a join token.
    #[error("malformed join token: expected sovra-join.<id>.<secret>.<ca-fingerprint>")]
    MalformedJoinToken,
}

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex(&buf)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex sha256 of a secret, as stored.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new operator token.
pub fn new_operator_token() -> String {
    format!("{OPERATOR_PREFIX}{}", random_hex(32))
}

/// A new tenant token.
pub fn new_tenant_token() -> String {
    format!("{TENANT_PREFIX}{}", random_hex(32))
}

/// A one-time join token: an id to find its record, a secret to prove possession, and the
/// fingerprint of the CA that issued it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id of the token (its record's key).
    pub id: String,
    /// The secret; only its hash is stored.
    pub secret: String,
    /// sha256 of the federation CA certificate (DER), lowercase hex.
    pub ca_fingerprint: String,
}

impl JoinToken {
    /// A fresh token for the CA with `ca_fingerprint`.
    pub fn generate(ca_fingerprint: &str) -> Self {
        Self {
            id: random_hex(8),
            secret: random_hex(24),
            ca_fingerprint: ca_fingerprint.to_string(),
        }
    }

    /// Parses the text form `sovra-join.<id>.<secret>.<ca-fingerprint>`.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let rest = text
            .trim()
            .strip_prefix(JOIN_PREFIX)
            .ok_or(TokenError::MalformedJoinToken)?;
        let parts: Vec<&str> = rest.split('.').collect();
        let is_hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        match parts.as_slice() {
            [id, secret, fp] if is_hex(id, 16) && is_hex(secret, 48) && is_hex(fp, 64) => {
                Ok(Self {
                    id: id.to_ascii_lowercase(),
                    secret: secret.to_ascii_lowercase(),
                    ca_fingerprint: fp.to_ascii_lowercase(),
                })
            }
            _ => Err(TokenError::MalformedJoinToken),
        }
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{JOIN_PREFIX}{}.{}.{}",
            self.id, self.secret, self.ca_fingerprint
        )
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}, ca {})", self.id, self.ca_fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_token_round_trips_and_rejects_garbage() {
        let fp = hex(&Sha256::digest(b"ca"));
        let token = JoinToken::generate(&fp);
        assert_eq!(JoinToken::parse(&token.to_string()).unwrap(), token);
        for bad in [
            "",
            "sovra-join.",
            "sovra-join.a.b.c",
            &token.to_string().replace("sovra-join.", "x."),
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
        let mut truncated = token.to_string();
        truncated.pop();
        assert!(JoinToken::parse(&truncated).is_err());
    }

    #[test]
    fn secrets_hash_and_compare() {
        assert_ne!(new_operator_token(), new_operator_token());
        assert!(new_tenant_token().starts_with(TENANT_PREFIX));
        assert_eq!(hash_secret("x"), hash_secret("x"));
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }
}
