//! The server's durable state behind one interface ([`Store`]): node
//! identities (which key a node id is bound to, in which organization),
//! organizations with their registration keys and operator tokens, desired
//! configurations, preview grants, the MCP allowlist and tokens, and the
//! audit trail. Handlers talk to the trait, so a database-backed store
//! replaces [`SqliteStore`] without touching them.

use super::orgs::{OperatorToken, Organization, RegistrationKey};
use super::preview::PreviewGrant;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A token for the MCP endpoint, narrower than the operator's. Only its
/// SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpToken {
    pub id: String,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// Nodes it may use (and that are on the allowlist); empty: any
    /// allow-listed node.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Task ids it may name start with this.
    #[serde(default)]
    pub task_prefix: Option<String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// The organization whose operator made it (none: the admin's, every
    /// organization).
    #[serde(default)]
    pub org: Option<String>,
    /// Unix seconds after which it is refused: that of the operator token
    /// that made it, so a short-lived token cannot mint a lasting one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

impl McpToken {
    pub fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }
}

/// A node id bound to the key that registered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    /// Hex Ed25519 public key of the node.
    pub public_key: String,
    /// Random id of this binding: node tokens name it, so forgetting the
    /// node (or binding it anew) voids every token issued before.
    pub binding: String,
    /// RFC 3339 UTC.
    pub bound_at: String,
    /// The organization of the key it registered with.
    #[serde(default = "default_org")]
    pub org: String,
}

impl NodeIdentity {
    /// A new binding of `public_key` (trimmed, lower case) in `org`.
    pub(crate) fn fresh(public_key: &str, org: &str) -> NodeIdentity {
        NodeIdentity {
            public_key: public_key.trim().to_ascii_lowercase(),
            binding: crate::server::auth::random_secret(12),
            bound_at: crate::server::orgs::now_rfc3339(),
            org: org.to_string(),
        }
    }

    /// This binding, if `node_id` registering with the key and
    /// organization of `asked` may have it: first come, first bound.
    pub(crate) fn admit(self, node_id: &str, asked: &NodeIdentity) -> Result<Self, StoreError> {
        let node_id = node_id.to_string();
        if self.public_key != asked.public_key {
            Err(StoreError::BoundElsewhere { node_id })
        } else if self.org != asked.org {
            Err(StoreError::OtherOrganization { node_id })
        } else {
            Ok(self)
        }
    }
}

fn default_org() -> String {
    super::hub::DEFAULT_ORG.into()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "node {node_id} is bound to another key (an operator can forget it: tether ctl node rm {node_id})"
    )]
    BoundElsewhere { node_id: String },
    #[error(
        "node {node_id} belongs to another organization (an operator can forget it: tether ctl node rm {node_id})"
    )]
    OtherOrganization { node_id: String },
    #[error("organization {0} exists")]
    OrgExists(String),
    #[error("no such organization: {0}")]
    NoSuchOrg(String),
    #[error("organization {org} still has {nodes} node(s): forget them first (tether ctl node rm)")]
    OrgHasNodes { org: String, nodes: usize },
    #[error("the default organization (the server-wide key's) cannot be removed")]
    DefaultOrg,
    #[error("database: {0}")]
    Db(String),
    #[error("server state {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("server state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<StoreError> for crate::protocol::ErrorBody {
    fn from(e: StoreError) -> Self {
        use crate::protocol::{ErrorBody, ErrorCode};
        let code = match e {
            StoreError::BoundElsewhere { .. }
            | StoreError::OtherOrganization { .. }
            | StoreError::OrgExists(_)
            | StoreError::OrgHasNodes { .. }
            | StoreError::DefaultOrg => ErrorCode::Conflict,
            StoreError::NoSuchOrg(_) => ErrorCode::NotFound,
            StoreError::Io { .. } | StoreError::Sqlite { .. } => ErrorCode::Internal,
            StoreError::Db(_) => ErrorCode::Unavailable,
        };
        ErrorBody::new(code, e.to_string())
    }
}

/// What [`Store::claim_deployment`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The name was free and is now the node's.
    New,
    /// The name was already the node's.
    Held,
    /// Another node (that the store still knows) holds the name.
    TakenBy(String),
}

/// Durable server state. Methods are synchronous and quick for the
/// single-machine store; callers on an async path run writes on a blocking thread.
pub trait Store: Send + Sync + 'static {
    /// The identity bound to `node_id`, if any.
    fn node_identity(&self, node_id: &str) -> Option<NodeIdentity>;
    /// Binds `node_id` to `public_key` in organization `org`, or returns
    /// the existing binding if it is to the same key and organization;
    /// another key is [`StoreError::BoundElsewhere`], another organization
    /// [`StoreError::OtherOrganization`].
    fn bind_node(
        &self,
        node_id: &str,
        public_key: &str,
        org: &str,
    ) -> Result<NodeIdentity, StoreError>;
    /// The node's identity read from the store itself: a replica's copy
    /// may trail a binding another replica made a moment ago.
    fn refresh_node(&self, node_id: &str) -> Option<NodeIdentity> {
        self.node_identity(node_id)
    }
    /// Forgets a node's binding; true if there was one.
    /// Its desired configuration, its place on the MCP allowlist and its
    /// deployments' names go with it.
    fn forget_node(&self, node_id: &str) -> Result<bool, StoreError>;
    /// Whether `binding` is still the node's binding (checked on every
    /// heartbeat tick of its connection: no copies).
    fn is_current(&self, node_id: &str, binding: &str) -> bool;
    /// Keeps an issued preview grant (and drops expired ones).
    fn add_preview(&self, grant: PreviewGrant) -> Result<(), StoreError>;
    /// A grant that was issued and not revoked.
    fn preview(&self, id: &str) -> Option<PreviewGrant>;
    /// Revokes a grant; true if there was one.
    fn revoke_preview(&self, id: &str) -> Result<bool, StoreError>;
    /// Every grant not yet expired.
    fn previews(&self) -> Vec<PreviewGrant>;
    /// Nodes whose tools the MCP endpoint exposes.
    fn mcp_nodes(&self) -> Vec<String>;
    /// Puts a node on the MCP allowlist or takes it off; true if that
    /// changed anything.
    fn set_mcp_node(&self, node_id: &str, allowed: bool) -> Result<bool, StoreError>;
    /// Keeps an MCP token (hashed).
    fn add_mcp_token(&self, token: McpToken) -> Result<(), StoreError>;
    /// The token whose secret hashes to `hash`.
    fn mcp_token_by_hash(&self, hash: &str) -> Option<McpToken>;
    /// Revokes a token; true if there was one.
    fn revoke_mcp_token(&self, id: &str) -> Result<bool, StoreError>;
    fn mcp_tokens(&self) -> Vec<McpToken>;
    /// Keeps (or with `None` forgets) the configuration wanted on a node.
    fn set_desired_config(
        &self,
        node_id: &str,
        cfg: Option<&crate::protocol::NodeConfig>,
    ) -> Result<(), StoreError>;
    /// The node deployment `name` was made on (`deploy up`), until it is
    /// taken down or that node is forgotten. Deployment names are one
    /// namespace for the server: this record, not whichever node reports
    /// a name first after a restart, says whose a name is.
    fn deployment_node(&self, name: &str) -> Option<String>;
    /// Records (or with `None` forgets) the node deployment `name` runs on.
    fn set_deployment_node(&self, name: &str, node_id: Option<&str>) -> Result<(), StoreError>;
    /// Reserves deployment `name` for `node_id` before that node is asked
    /// to make it, in one step, so that of two `up`s of a new name (two
    /// organizations, perhaps at two replicas on one database) one wins.
    fn claim_deployment(&self, name: &str, node_id: &str) -> Result<Claim, StoreError>;
    /// Gives back a reservation [`claim_deployment`](Self::claim_deployment)
    /// made, if `node_id` still holds it (an `up` that made nothing).
    fn release_deployment(&self, name: &str, node_id: &str) -> Result<(), StoreError>;
    /// Every node's wanted configuration (restored into the hub at start).
    fn desired_configs(&self) -> Vec<(String, crate::protocol::NodeConfig)>;
    /// The configuration wanted on one node.
    fn desired_config(&self, node_id: &str) -> Option<crate::protocol::NodeConfig>;
    /// Every organization made with [`Store::add_organization`] (the
    /// default one always exists and is not kept).
    fn organizations(&self) -> Vec<Organization>;
    /// Keeps a new organization with its first registration key; an
    /// existing name is [`StoreError::OrgExists`].
    fn add_organization(&self, org: Organization, key: RegistrationKey) -> Result<(), StoreError>;
    /// Keeps another registration key of an existing organization.
    fn add_registration_key(&self, key: RegistrationKey) -> Result<(), StoreError>;
    /// The registration key whose secret hashes to `hash`.
    fn registration_key_by_hash(&self, hash: &str) -> Option<RegistrationKey>;
    /// Keeps an operator token (hashed) of an existing organization.
    fn add_operator_token(&self, token: OperatorToken) -> Result<(), StoreError>;
    /// The operator token whose secret hashes to `hash` (expired or not).
    fn operator_token_by_hash(&self, hash: &str) -> Option<OperatorToken>;
    /// The token read from the store itself: a replica's copy may trail a
    /// token another replica made a moment ago.
    fn refresh_operator_token(&self, hash: &str) -> Option<OperatorToken> {
        self.operator_token_by_hash(hash)
    }
    fn operator_tokens(&self) -> Vec<OperatorToken>;
    /// Revokes an operator token; true if there was one.
    fn revoke_operator_token(&self, id: &str) -> Result<bool, StoreError>;
    /// Removes an organization with its registration keys, operator tokens,
    /// MCP tokens and preview grants (an organization made later under the
    /// same name inherits none of them); refused ([`StoreError::OrgHasNodes`]) while a node
    /// belongs to it, and for `default`. False if there was none.
    fn remove_organization(&self, name: &str) -> Result<bool, StoreError>;
    /// The server secret `name` (`admin.token`, `jwt.key`, `preview.key`),
    /// keeping `fresh` as it if there is none yet.
    fn secret(&self, name: &str, fresh: String) -> Result<String, StoreError>;
    /// Records that replica `id` answers at `url` and holds the
    /// connections of `nodes` (and no others) for `lease` from now. A
    /// single server has no peers: its store keeps none of it.
    fn hold_nodes(
        &self,
        _id: &str,
        _url: &str,
        _nodes: &[String],
        _lease: std::time::Duration,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// The replica whose lease holds `node_id`'s connection: its id and URL.
    fn node_holder(&self, _node_id: &str) -> Option<(String, String)> {
        None
    }
    /// The other replicas seen within their lease: ids and URLs.
    fn peers(&self, _id: &str) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Records that a node proof (by its digest) was used, until
    /// `until_ms`; false if it was used before. Replicas share this, so a
    /// captured proof opens nothing at a second replica; a single server's
    /// own memory of proofs is enough, and it keeps none.
    fn use_proof(
        &self,
        _digest: &str,
        _until_ms: u64,
    ) -> futures_util::future::BoxFuture<'static, Result<bool, StoreError>> {
        Box::pin(std::future::ready(Ok(true)))
    }
    /// Appends to the audit trail of sandbox operations.
    fn append_audit(&self, record: &super::audit::AuditRecord) -> Result<(), StoreError>;
    /// Audit records matching `filter`, oldest first.
    fn audit(&self, filter: &super::audit::AuditFilter) -> Vec<super::audit::AuditRecord>;
}

mod postgres;
mod sqlite;
pub(super) mod state;

pub use postgres::PgStore;
pub use sqlite::{DB_FILE, SqliteStore};
