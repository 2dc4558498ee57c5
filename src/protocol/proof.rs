//! Node identity proofs (`docs/protocol.md` §3.3): a node holds an Ed25519
//! key pair; registration binds its node id to the public key, and every
//! registration and connection carries a fresh signature made with the
//! private key. A shared registration key or a copied node token alone can
//! therefore not act as another node.
//!
//! A proof is `<unix milliseconds>.<hex signature>` over
//! `tether-node-proof:v1:<purpose>:<node id>:<unix milliseconds>`. Pure
//! functions only: signing with a key file is the agent's
//! (`agent::identity`), checking and replay state are the server's.

use ring::signature::{ED25519, UnparsedPublicKey};
use std::time::{SystemTime, UNIX_EPOCH};

/// What a proof is for: a proof made for one cannot be used for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofPurpose {
    Register,
    Connect,
}

impl ProofPurpose {
    fn as_str(self) -> &'static str {
        match self {
            ProofPurpose::Register => "register",
            ProofPurpose::Connect => "connect",
        }
    }
}

/// Header that carries the connection proof on the WebSocket upgrade.
pub const PROOF_HEADER: &str = "tether-node-proof";

/// How far a proof's time may be from the server's clock.
pub const MAX_PROOF_SKEW_MS: u64 = 5 * 60 * 1000;

/// The bytes a proof signs.
pub fn proof_message(purpose: ProofPurpose, node_id: &str, millis: u64) -> Vec<u8> {
    format!(
        "tether-node-proof:v1:{}:{node_id}:{millis}",
        purpose.as_str()
    )
    .into_bytes()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Why a proof was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the node proof is malformed (expected <unix ms>.<hex signature>)")]
    Malformed,
    #[error("the node's public key must be 64 hex digits (Ed25519)")]
    BadKey,
    #[error("the node proof's time is more than 5 minutes from the server's clock")]
    Stale,
    #[error("the node proof's signature does not match the node's key")]
    BadSignature,
}

/// Checks `proof` against the hex Ed25519 `public_key`; returns the proof's
/// time (milliseconds) so the caller can refuse replays.
pub fn verify_proof(
    public_key: &str,
    purpose: ProofPurpose,
    node_id: &str,
    proof: &str,
    now_ms: u64,
) -> Result<u64, ProofError> {
    let key = hex::decode(public_key.trim())
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or(ProofError::BadKey)?;
    let (ms, sig) = proof.trim().split_once('.').ok_or(ProofError::Malformed)?;
    // Digits only, as a node writes it (`parse` also takes a sign).
    if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProofError::Malformed);
    }
    let ms: u64 = ms.parse().map_err(|_| ProofError::Malformed)?;
    let sig = hex::decode(sig).map_err(|_| ProofError::Malformed)?;
    if ms.abs_diff(now_ms) > MAX_PROOF_SKEW_MS {
        return Err(ProofError::Stale);
    }
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&proof_message(purpose, node_id, ms), &sig)
        .map_err(|_| ProofError::BadSignature)?;
    Ok(ms)
}

/// A short, stable name for a public key (first 16 hex digits of its
/// SHA-256): what node tokens carry to say which key they were issued to.
pub fn key_id(public_key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(public_key.trim().to_ascii_lowercase().as_bytes());
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn sign(k: &Ed25519KeyPair, p: ProofPurpose, node: &str, ms: u64) -> String {
        format!(
            "{ms}.{}",
            hex::encode(k.sign(&proof_message(p, node, ms)).as_ref())
        )
    }

    #[test]
    fn proofs_bind_key_node_purpose_and_time() {
        let k = key();
        let pubkey = hex::encode(k.public_key().as_ref());
        let now = now_millis();
        let p = sign(&k, ProofPurpose::Connect, "n1", now);
        assert_eq!(
            verify_proof(&pubkey, ProofPurpose::Connect, "n1", &p, now),
            Ok(now)
        );
        // Another node id, another purpose, another key, an old proof: refused.
        assert_eq!(
            verify_proof(&pubkey, ProofPurpose::Connect, "n2", &p, now),
            Err(ProofError::BadSignature)
        );
        assert_eq!(
            verify_proof(&pubkey, ProofPurpose::Register, "n1", &p, now),
            Err(ProofError::BadSignature)
        );
        let other = hex::encode(key().public_key().as_ref());
        assert_eq!(
            verify_proof(&other, ProofPurpose::Connect, "n1", &p, now),
            Err(ProofError::BadSignature)
        );
        assert_eq!(
            verify_proof(
                &pubkey,
                ProofPurpose::Connect,
                "n1",
                &p,
                now + MAX_PROOF_SKEW_MS + 1
            ),
            Err(ProofError::Stale)
        );
        assert_eq!(
            verify_proof(&pubkey, ProofPurpose::Connect, "n1", "garbage", now),
            Err(ProofError::Malformed)
        );
        assert_eq!(
            verify_proof("abcd", ProofPurpose::Connect, "n1", &p, now),
            Err(ProofError::BadKey)
        );
        assert_eq!(key_id(&pubkey).len(), 16);
        assert_eq!(key_id(&pubkey), key_id(&pubkey.to_uppercase()));
    }
}
