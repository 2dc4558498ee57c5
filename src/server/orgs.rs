//! Organizations: each node belongs to exactly one, by the registration key
//! it used; each has its own registration keys and operator tokens, and an
//! organization's operators see only its nodes, workers and deployments.
//! The server's admin token (`admin.token`) sees everything and manages
//! organizations. Secrets are kept only as SHA-256 digests.

use super::hub::{DEFAULT_ORG, OrgScope};
use crate::protocol::{ErrorBody, ErrorCode};
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

/// An organization (`tether ctl org create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organization {
    pub name: String,
    /// RFC 3339 UTC.
    pub created_at: String,
}

/// A key nodes register with; the node joins the key's organization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationKey {
    pub id: String,
    pub org: String,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    pub created_at: String,
}

/// An operator token of one organization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorToken {
    pub id: String,
    pub org: String,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    pub created_at: String,
    /// Unix seconds after which it is refused; none: until revoked.
    #[serde(default)]
    pub expires: Option<u64>,
}

impl OperatorToken {
    pub fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// Who makes an operator request: the scope it sees, and how the audit
/// trail names it (never by its secret).
#[derive(Debug, Clone)]
pub struct Caller {
    pub scope: OrgScope,
    /// `operator` (the admin token) or `token:<id>`.
    pub name: String,
}

impl Caller {
    pub fn admin() -> Caller {
        Caller {
            scope: OrgScope::All,
            name: "operator".into(),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.scope == OrgScope::All
    }

    /// Whose detached execs and tunnels this caller may take back: its own
    /// (`Some(name)`), or, for the admin, anyone's (`None`).
    pub fn reattaches_as(&self) -> Option<&str> {
        (!self.is_admin()).then_some(self.name.as_str())
    }

    /// Refuses a caller who is not the server's admin.
    pub fn require_admin(&self, what: &str) -> Result<(), ErrorBody> {
        if self.is_admin() {
            return Ok(());
        }
        Err(ErrorBody::new(
            ErrorCode::PolicyDenied,
            format!("only the server's admin token may {what}"),
        ))
    }

    /// Whether this caller sees organization `org`.
    pub fn sees(&self, org: &str) -> bool {
        self.scope.admits(org)
    }
}

/// How an organization's operator token begins.
pub const TOKEN_PREFIX: &str = "top_";
/// What an MCP token starts with.
pub const MCP_TOKEN_PREFIX: &str = "tmcp_";

/// Hex SHA-256 of a secret, as tokens and keys are kept.
pub fn secret_hash(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// A fresh id for a key or token (lower-case ULID).
pub fn new_id() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Organization names: 1-63 lower-case letters, digits and '-', starting
/// with a letter (they appear in listings and URLs).
pub fn check_name(name: &str) -> Result<(), ErrorBody> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!(
                "organization name {name:?}: 1-63 lower-case letters, digits and '-', starting with a letter"
            ),
        ))
    }
}

/// Whether `name` is the organization of the server-wide key, which always
/// exists.
pub fn is_default(name: &str) -> bool {
    name == DEFAULT_ORG
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["acme", "a", "team-2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Acme", "2team", "-x", "a_b", "a.b", &"a".repeat(64)] {
            assert_eq!(
                check_name(bad).unwrap_err().code,
                ErrorCode::InvalidRequest,
                "{bad}"
            );
        }
    }

    #[test]
    fn scopes_and_expiry() {
        let org = Caller {
            scope: OrgScope::Org("acme".into()),
            name: "token:x".into(),
        };
        assert!(org.sees("acme") && !org.sees("other") && !org.is_admin());
        assert_eq!(
            org.require_admin("create organizations").unwrap_err().code,
            ErrorCode::PolicyDenied
        );
        assert!(Caller::admin().sees("anything"));
        let t = OperatorToken {
            id: "i".into(),
            org: "acme".into(),
            hash: secret_hash("s"),
            created_at: now_rfc3339(),
            expires: Some(100),
        };
        assert!(t.expired(100) && !t.expired(99));
        assert_eq!(secret_hash("s").len(), 64);
    }
}
