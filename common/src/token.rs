//! Join tokens, in Docker Swarm's shape: `SWMTKN-1-<digest>-<secret>`.
//!
//! The digest is the SHA-256 of the cluster CA certificate: a joining node
//! fetches the CA certificate without trusting anyone, then accepts it only if
//! its digest matches the token. The secret proves the node may join; managers
//! keep one for workers and one for managers and compare with
//! [`secrets_match`].

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::id::{base36, is_base36_digit};

/// Fixed prefix (Swarm's, so tokens are recognisable) and format version.
const PREFIX: &str = "SWMTKN";
const VERSION: &str = "1";

/// Length of the CA digest: 256 bits need at most 50 base-36 digits.
pub const DIGEST_LEN: usize = 50;
/// Length of the secret: 128 random bits in base 36.
pub const SECRET_LEN: usize = 25;

/// Why a string is not a usable join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "invalid join token: expected SWMTKN-1-<digest>-<secret> (print a valid one with `mesh join-token worker` or `mesh join-token manager` on a manager)"
    )]
    Malformed,
    #[error(
        "unsupported join token version {0:?}: this mesh understands SWMTKN-1 tokens only; print a new one on a manager"
    )]
    UnsupportedVersion(String),
    #[error(
        "invalid join token: the CA digest must be {DIGEST_LEN} lowercase base-36 characters, got {0} (was the token cut short when copied?)"
    )]
    BadDigest(usize),
    #[error(
        "invalid join token: the secret must be {SECRET_LEN} lowercase base-36 characters, got {0} (was the token cut short when copied?)"
    )]
    BadSecret(usize),
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// [`ca_digest`] of the cluster CA certificate the token belongs to.
    pub ca_digest: String,
    /// The shared secret proving the right to join.
    pub secret: String,
}

impl JoinToken {
    /// Whether `ca_cert_der` is the CA this token pins (constant time, though
    /// the digest is public anyway).
    pub fn matches_ca(&self, ca_cert_der: &[u8]) -> bool {
        secrets_match(&self.ca_digest, &ca_digest(ca_cert_der))
    }
}

/// Renders the token back to `SWMTKN-1-<digest>-<secret>`.
impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}-{VERSION}-{}-{}", self.ca_digest, self.secret)
    }
}

/// Hides the secret so tokens can be logged by accident without leaking.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_digest", &self.ca_digest)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// SHA-256 of the CA certificate (DER), in base 36, zero-padded to 50 chars.
pub fn ca_digest(ca_cert_der: &[u8]) -> String {
    base36(&Sha256::digest(ca_cert_der), DIGEST_LEN)
}

/// A new token for the CA `ca_cert_der`, with a fresh random secret.
pub fn generate(ca_cert_der: &[u8]) -> String {
    let secret = base36(&rand::random::<u128>().to_be_bytes(), SECRET_LEN);
    format!("{PREFIX}-{VERSION}-{}-{secret}", ca_digest(ca_cert_der))
}

/// Parses `SWMTKN-1-<digest>-<secret>`; surrounding whitespace (from copy and
/// paste) is ignored.
pub fn parse(s: &str) -> Result<JoinToken, TokenError> {
    let parts: Vec<&str> = s.trim().split('-').collect();
    let [prefix, version, digest, secret] = parts.as_slice() else {
        return Err(TokenError::Malformed);
    };
    if *prefix != PREFIX {
        return Err(TokenError::Malformed);
    }
    if *version != VERSION {
        return Err(TokenError::UnsupportedVersion((*version).to_owned()));
    }
    if digest.len() != DIGEST_LEN || !digest.bytes().all(is_base36_digit) {
        return Err(TokenError::BadDigest(digest.len()));
    }
    if secret.len() != SECRET_LEN || !secret.bytes().all(is_base36_digit) {
        return Err(TokenError::BadSecret(secret.len()));
    }
    Ok(JoinToken {
        ca_digest: (*digest).to_owned(),
        secret: (*secret).to_owned(),
    })
}

/// Compares two secrets in time independent of where they differ, so a
/// guesser learns nothing from response times (only the length may leak).
pub fn secrets_match(a: &str, b: &str) -> bool {
    bytes_match(a.as_bytes(), b.as_bytes())
}

fn bytes_match(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Which end of a join a proof comes from, so one end's proof can never be
/// reflected back as the other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofSide {
    /// The joining node: "I know the secret".
    Node,
    /// The manager answering: "I know it too", over what it answers.
    Manager,
}

/// A join proof: HMAC-SHA-256, keyed with the token's secret, over the TLS
/// connection's exporter and `content`. The secret itself never crosses the
/// wire, so a server that is not a current manager learns nothing from a
/// joining node; and a proof made for one connection is useless on another.
pub fn join_proof(secret: &str, side: ProofSide, exporter: &[u8; 32], content: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm is never taken.
        Err(_) => return Vec::new(),
    };
    mac.update(match side {
        ProofSide::Node => b"mesh join: node\0",
        ProofSide::Manager => b"mesh join: manager\0",
    });
    mac.update(exporter);
    mac.update(content);
    mac.finalize().into_bytes().to_vec()
}

/// Length of a [`join_proof`].
pub const PROOF_LEN: usize = 32;

/// Constant-time comparison of two proofs; anything but two full-length
/// proofs is a mismatch.
pub fn proofs_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == PROOF_LEN && b.len() == PROOF_LEN && bytes_match(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &[u8] = b"not really DER, but any bytes will do";

    #[test]
    fn join_proofs_bind_secret_side_connection_and_content() {
        let (secret, other) = ("s3cret", "0ther");
        let (conn, conn2) = ([1u8; 32], [2u8; 32]);
        let p = join_proof(secret, ProofSide::Node, &conn, b"csr");
        assert_eq!(p.len(), PROOF_LEN);
        assert!(proofs_match(
            &p,
            &join_proof(secret, ProofSide::Node, &conn, b"csr")
        ));
        for differs in [
            join_proof(other, ProofSide::Node, &conn, b"csr"),
            join_proof(secret, ProofSide::Manager, &conn, b"csr"),
            join_proof(secret, ProofSide::Node, &conn2, b"csr"),
            join_proof(secret, ProofSide::Node, &conn, b"csr2"),
        ] {
            assert!(!proofs_match(&p, &differs));
        }
        assert!(!proofs_match(&[], &[]), "empty proofs never match");
    }

    #[test]
    fn generated_token_parses_and_pins_the_ca() {
        let token = generate(CA);
        assert_eq!(token.len(), "SWMTKN-1-".len() + DIGEST_LEN + 1 + SECRET_LEN);
        let parsed = parse(&token).expect("generated token parses");
        assert_eq!(parsed.ca_digest, ca_digest(CA));
        assert_eq!(parsed.secret.len(), SECRET_LEN);
        assert!(parsed.matches_ca(CA));
        assert!(!parsed.matches_ca(b"another CA"));
        assert_eq!(parsed.to_string(), token);
        assert_eq!(token.parse::<JoinToken>(), Ok(parsed));
    }

    #[test]
    fn secrets_differ_between_tokens() {
        let a = parse(&generate(CA)).expect("parses");
        let b = parse(&generate(CA)).expect("parses");
        assert_eq!(a.ca_digest, b.ca_digest);
        assert_ne!(a.secret, b.secret);
    }

    #[test]
    fn digest_is_sha256_in_base36() {
        // SHA-256("") = e3b0c442…b855, converted to base 36 independently.
        let d = ca_digest(b"");
        assert_eq!(d.len(), DIGEST_LEN);
        assert_eq!(d, "5oaq0bjhj6un82wg98mgigso5q7qlhc63je4gw7ivixqqhkd3p");
    }

    #[test]
    fn whitespace_is_ignored() {
        let token = generate(CA);
        assert!(parse(&format!("  {token}\n")).is_ok());
    }

    #[test]
    fn bad_tokens_are_rejected_with_reasons() {
        let token = generate(CA);
        let digest = ca_digest(CA);
        let secret = "0123456789abcdefghijklmno";
        assert_eq!(parse(""), Err(TokenError::Malformed));
        assert_eq!(parse("hello"), Err(TokenError::Malformed));
        assert_eq!(
            parse(&format!("XXXTKN-1-{digest}-{secret}")),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            parse(&format!("SWMTKN-2-{digest}-{secret}")),
            Err(TokenError::UnsupportedVersion("2".into()))
        );
        assert_eq!(
            parse(&format!("SWMTKN-1-{}-{secret}", &digest[..10])),
            Err(TokenError::BadDigest(10))
        );
        assert_eq!(
            parse(&format!("SWMTKN-1-{}-{secret}", digest.to_uppercase())),
            Err(TokenError::BadDigest(DIGEST_LEN))
        );
        assert_eq!(
            parse(&token[..token.len() - 3]),
            Err(TokenError::BadSecret(SECRET_LEN - 3))
        );
        assert_eq!(parse(&format!("{token}-extra")), Err(TokenError::Malformed));
        assert!(
            TokenError::Malformed
                .to_string()
                .starts_with("invalid join token: expected SWMTKN-1-<digest>-<secret>")
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let parsed = parse(&generate(CA)).expect("parses");
        let shown = format!("{parsed:?}");
        assert!(!shown.contains(&parsed.secret), "{shown}");
    }

    #[test]
    fn secrets_match_compares_exactly() {
        assert!(secrets_match("abc", "abc"));
        assert!(secrets_match("", ""));
        assert!(!secrets_match("abc", "abd"));
        assert!(!secrets_match("abc", "abcd"));
        assert!(!secrets_match("abc", ""));
    }
}
