//! Credentials: the registration pre-shared key, node JWTs and the operator
//! token. Secrets are compared in constant time and never logged.

use crate::protocol::{ErrorBody, ErrorCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;

const AUDIENCE: &str = "tether-agent";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    iat: u64,
    nbf: u64,
    exp: u64,
    /// The node identity binding the token was issued to
    /// (`store::NodeIdentity::binding`): forgetting the node voids it.
    bid: String,
}

/// What a valid node token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeClaims {
    pub node_id: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    pub binding: String,
}

/// Signs and checks node JWTs (HS256 with a server-held key).
pub struct Signer {
    enc: EncodingKey,
    dec: DecodingKey,
    ttl: Duration,
}

impl Signer {
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn new(key: &[u8], ttl: Duration) -> Self {
        Signer {
            enc: EncodingKey::from_secret(key),
            dec: DecodingKey::from_secret(key),
            ttl,
        }
    }

    /// Issues a token for `node_id` under identity `binding`; returns it
    /// with its expiry.
    pub fn issue(&self, node_id: &str, binding: &str) -> (String, SystemTime) {
        let now = SystemTime::now();
        let exp = now + self.ttl;
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let claims = Claims {
            sub: node_id.to_string(),
            aud: AUDIENCE.into(),
            iat: secs(now),
            nbf: secs(now),
            exp: secs(exp),
            bid: binding.to_string(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc)
            .expect("HS256 signing cannot fail");
        (token, exp)
    }

    /// Checks a token's signature, audience and times (`exp` and `nbf`,
    /// 5 s leeway); whether its binding is still current is the caller's.
    pub fn verify(&self, token: &str) -> Result<NodeClaims, ErrorBody> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[AUDIENCE]);
        v.set_required_spec_claims(&["exp", "nbf", "aud", "sub"]);
        v.validate_nbf = true;
        v.leeway = 5;
        jsonwebtoken::decode::<Claims>(token, &self.dec, &v)
            .map(|d| NodeClaims {
                node_id: d.claims.sub,
                exp: d.claims.exp,
                binding: d.claims.bid,
            })
            .map_err(|e| {
                ErrorBody::new(ErrorCode::Unauthorized, format!("invalid node token: {e}"))
            })
    }
}

/// Constant-time equality of two secrets.
pub fn secret_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    header?.strip_prefix("Bearer ").map(str::trim)
}

/// A random hex secret of `bytes` bytes.
pub fn random_secret(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_and_reject_forgery() {
        let s = Signer::new(b"k1", Duration::from_secs(60));
        let (t, _) = s.issue("n1", "b1");
        let c = s.verify(&t).unwrap();
        assert_eq!((c.node_id.as_str(), c.binding.as_str()), ("n1", "b1"));
        let other = Signer::new(b"k2", Duration::from_secs(60));
        assert_eq!(other.verify(&t).unwrap_err().code, ErrorCode::Unauthorized);
        assert!(s.verify("garbage").is_err());
    }

    #[test]
    fn expired_token_rejected() {
        let s = Signer::new(b"k", Duration::ZERO);
        let claims = Claims {
            sub: "n".into(),
            aud: AUDIENCE.into(),
            iat: 0,
            nbf: 0,
            exp: 1,
            bid: "b".into(),
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &s.enc).unwrap();
        let e = s.verify(&t).unwrap_err();
        assert!(e.message.contains("xpired"), "{e}");
    }

    #[test]
    fn token_not_yet_valid_rejected() {
        let s = Signer::new(b"k", Duration::from_secs(60));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = Claims {
            sub: "n".into(),
            aud: AUDIENCE.into(),
            iat: now,
            nbf: now + 3600,
            exp: now + 7200,
            bid: "b".into(),
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &s.enc).unwrap();
        let e = s.verify(&t).unwrap_err();
        assert!(e.message.contains("mmature"), "{e}");
    }

    #[test]
    fn secrets() {
        assert!(secret_eq("abc", "abc"));
        assert!(!secret_eq("abc", "abd"));
        assert!(!secret_eq("abc", "ab"));
        assert_eq!(bearer(Some("Bearer xyz")), Some("xyz"));
        assert_eq!(bearer(Some("Basic xyz")), None);
        assert_eq!(random_secret(16).len(), 32);
    }
}
