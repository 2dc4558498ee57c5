//! The node's own key pair: made on first start, kept 0600 in the state
//! directory (`node.key`), proven at registration and on every connection
//! (`protocol::proof`). The server binds the node id to its public key, so
//! nobody else holding the registration key can take the node's place.

use crate::protocol::{ProofPurpose, now_millis, proof_message};
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::path::Path;

/// File name of the key under the state directory.
pub const KEY_FILE: &str = "node.key";

/// The node's Ed25519 key.
pub struct NodeKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl NodeKey {
    /// Loads the key of `state_dir`, making one (0600) if there is none.
    pub fn load_or_create(state_dir: &Path) -> std::io::Result<NodeKey> {
        let path = state_dir.join(KEY_FILE);
        let bad = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let der = hex::decode(text.trim()).map_err(|_| bad("not a hex PKCS#8 key"))?;
                let pair = Ed25519KeyPair::from_pkcs8(&der)
                    .map_err(|_| bad("not an Ed25519 PKCS#8 key"))?;
                Ok(NodeKey { pair })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let der = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| std::io::Error::other("could not generate a key"))?;
                crate::private_file::write(&path, &hex::encode(der.as_ref()))?;
                let pair =
                    Ed25519KeyPair::from_pkcs8(der.as_ref()).map_err(|_| bad("bad new key"))?;
                Ok(NodeKey { pair })
            }
            Err(e) => Err(e),
        }
    }

    /// A key held in memory only (simulated nodes, tests).
    pub fn generate() -> NodeKey {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system RNG works");
        NodeKey {
            pair: Ed25519KeyPair::from_pkcs8(der.as_ref()).expect("a fresh key parses"),
        }
    }

    /// The public key, hex.
    pub fn public_key(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// A fresh proof for `purpose` (`<unix ms>.<hex signature>`).
    pub fn proof(&self, purpose: ProofPurpose, node_id: &str) -> String {
        self.proof_at(purpose, node_id, now_millis())
    }

    /// A proof dated `ms` (Unix milliseconds): for tests and simulators.
    pub fn proof_at(&self, purpose: ProofPurpose, node_id: &str, ms: u64) -> String {
        let sig = self.pair.sign(&proof_message(purpose, node_id, ms));
        format!("{ms}.{}", hex::encode(sig.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::verify_proof;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_made_once_kept_private_and_proves() {
        let dir = tempfile::tempdir().unwrap();
        let k = NodeKey::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = NodeKey::load_or_create(dir.path()).unwrap();
        assert_eq!(k.public_key(), again.public_key());
        let p = again.proof(ProofPurpose::Register, "n1");
        verify_proof(
            &k.public_key(),
            ProofPurpose::Register,
            "n1",
            &p,
            now_millis(),
        )
        .unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "zz").unwrap();
        assert!(NodeKey::load_or_create(dir.path()).is_err());
    }
}
