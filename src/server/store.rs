//! The server's durable state behind one interface ([`Store`]): today the
//! node identities (which key a node id is bound to). Handlers talk to the
//! trait, so a database-backed store replaces [`FileStore`] without touching
//! them.

use super::preview::PreviewGrant;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

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
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "node {node_id} is bound to another key (an operator can forget it: tether ctl node rm {node_id})"
    )]
    BoundElsewhere { node_id: String },
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
            StoreError::BoundElsewhere { .. } => ErrorCode::Conflict,
            StoreError::Io { .. } => ErrorCode::Internal,
        };
        ErrorBody::new(code, e.to_string())
    }
}

/// Durable server state. Methods are synchronous and quick for the file
/// store; callers on an async path run writes on a blocking thread.
pub trait Store: Send + Sync + 'static {
    /// The identity bound to `node_id`, if any.
    fn node_identity(&self, node_id: &str) -> Option<NodeIdentity>;
    /// Binds `node_id` to `public_key`, or returns the existing binding if
    /// it is to the same key; another key is [`StoreError::BoundElsewhere`].
    fn bind_node(&self, node_id: &str, public_key: &str) -> Result<NodeIdentity, StoreError>;
    /// Forgets a node's binding; true if there was one.
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
    /// Every node's wanted configuration (restored into the hub at start).
    fn desired_configs(&self) -> Vec<(String, crate::protocol::NodeConfig)>;
    /// Appends to the audit trail of sandbox operations.
    fn append_audit(&self, record: &super::audit::AuditRecord) -> Result<(), StoreError>;
    /// Audit records matching `filter`, oldest first.
    fn audit(&self, filter: &super::audit::AuditFilter) -> Vec<super::audit::AuditRecord>;
}

#[derive(Default, Serialize, Deserialize)]
struct FileState {
    version: u32,
    nodes: BTreeMap<String, NodeIdentity>,
    #[serde(default)]
    previews: BTreeMap<String, PreviewGrant>,
    #[serde(default)]
    mcp_nodes: std::collections::BTreeSet<String>,
    #[serde(default)]
    mcp_tokens: BTreeMap<String, McpToken>,
    /// The configuration pushed to each node (it may hold registry
    /// credentials: the file is 0600, as the server's other secrets).
    #[serde(default)]
    desired_configs: BTreeMap<String, crate::protocol::NodeConfig>,
}

/// A JSON file under the server's state directory, written atomically
/// (0600) on every change; read once at start.
pub struct FileStore {
    path: PathBuf,
    state: Mutex<FileState>,
    /// `audit.jsonl` beside the state file.
    audit: super::audit::AuditLog,
}

impl FileStore {
    pub fn open(path: PathBuf) -> Result<FileStore, StoreError> {
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileState {
                version: 1,
                ..Default::default()
            },
            Err(e) => return Err(io(e)),
        };
        let audit = super::audit::AuditLog::new(
            path.with_file_name("audit.jsonl"),
            super::audit::DEFAULT_MAX_BYTES,
        );
        Ok(FileStore {
            path,
            state: Mutex::new(state),
            audit,
        })
    }

    fn save(&self, state: &FileState) -> Result<(), StoreError> {
        let text = serde_json::to_string_pretty(state).expect("state serialises");
        crate::private_file::write(&self.path, &text).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

impl Store for FileStore {
    fn node_identity(&self, node_id: &str) -> Option<NodeIdentity> {
        self.state.lock().unwrap().nodes.get(node_id).cloned()
    }

    fn bind_node(&self, node_id: &str, public_key: &str) -> Result<NodeIdentity, StoreError> {
        let public_key = public_key.trim().to_ascii_lowercase();
        let mut state = self.state.lock().unwrap();
        if let Some(existing) = state.nodes.get(node_id) {
            return if existing.public_key == public_key {
                Ok(existing.clone())
            } else {
                Err(StoreError::BoundElsewhere {
                    node_id: node_id.to_string(),
                })
            };
        }
        let identity = NodeIdentity {
            public_key,
            binding: super::auth::random_secret(12),
            bound_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        state.nodes.insert(node_id.to_string(), identity.clone());
        if let Err(e) = self.save(&state) {
            state.nodes.remove(node_id);
            return Err(e);
        }
        Ok(identity)
    }

    fn is_current(&self, node_id: &str, binding: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .nodes
            .get(node_id)
            .is_some_and(|i| i.binding == binding)
    }

    fn forget_node(&self, node_id: &str) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        let Some(old) = state.nodes.remove(node_id) else {
            return Ok(false);
        };
        let desired = state.desired_configs.remove(node_id);
        if let Err(e) = self.save(&state) {
            state.nodes.insert(node_id.to_string(), old);
            if let Some(d) = desired {
                state.desired_configs.insert(node_id.to_string(), d);
            }
            return Err(e);
        }
        Ok(true)
    }

    fn set_desired_config(
        &self,
        node_id: &str,
        cfg: Option<&crate::protocol::NodeConfig>,
    ) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        let old = match cfg {
            Some(c) => state.desired_configs.insert(node_id.to_string(), c.clone()),
            None => state.desired_configs.remove(node_id),
        };
        if let Err(e) = self.save(&state) {
            match old {
                Some(o) => state.desired_configs.insert(node_id.to_string(), o),
                None => state.desired_configs.remove(node_id),
            };
            return Err(e);
        }
        Ok(())
    }

    fn desired_configs(&self) -> Vec<(String, crate::protocol::NodeConfig)> {
        let state = self.state.lock().unwrap();
        state
            .desired_configs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn add_preview(&self, grant: PreviewGrant) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        let now = super::preview::now_secs();
        state.previews.retain(|_, g| g.expires > now);
        let id = grant.id.clone();
        state.previews.insert(id.clone(), grant);
        if let Err(e) = self.save(&state) {
            state.previews.remove(&id);
            return Err(e);
        }
        Ok(())
    }

    fn preview(&self, id: &str) -> Option<PreviewGrant> {
        self.state.lock().unwrap().previews.get(id).cloned()
    }

    fn revoke_preview(&self, id: &str) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        let Some(old) = state.previews.remove(id) else {
            return Ok(false);
        };
        if let Err(e) = self.save(&state) {
            state.previews.insert(id.to_string(), old);
            return Err(e);
        }
        Ok(true)
    }

    fn previews(&self) -> Vec<PreviewGrant> {
        let now = super::preview::now_secs();
        let state = self.state.lock().unwrap();
        state
            .previews
            .values()
            .filter(|g| g.expires > now)
            .cloned()
            .collect()
    }

    fn mcp_nodes(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .mcp_nodes
            .iter()
            .cloned()
            .collect()
    }

    fn add_mcp_token(&self, token: McpToken) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        let id = token.id.clone();
        state.mcp_tokens.insert(id.clone(), token);
        if let Err(e) = self.save(&state) {
            state.mcp_tokens.remove(&id);
            return Err(e);
        }
        Ok(())
    }

    fn mcp_token_by_hash(&self, hash: &str) -> Option<McpToken> {
        let state = self.state.lock().unwrap();
        state
            .mcp_tokens
            .values()
            .find(|t| super::auth::secret_eq(&t.hash, hash))
            .cloned()
    }

    fn revoke_mcp_token(&self, id: &str) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        let Some(old) = state.mcp_tokens.remove(id) else {
            return Ok(false);
        };
        if let Err(e) = self.save(&state) {
            state.mcp_tokens.insert(id.to_string(), old);
            return Err(e);
        }
        Ok(true)
    }

    fn append_audit(&self, record: &super::audit::AuditRecord) -> Result<(), StoreError> {
        self.audit.append(record).map_err(|source| StoreError::Io {
            path: self.path.with_file_name("audit.jsonl"),
            source,
        })
    }

    fn audit(&self, filter: &super::audit::AuditFilter) -> Vec<super::audit::AuditRecord> {
        self.audit.read(filter)
    }

    fn mcp_tokens(&self) -> Vec<McpToken> {
        self.state
            .lock()
            .unwrap()
            .mcp_tokens
            .values()
            .cloned()
            .collect()
    }

    fn set_mcp_node(&self, node_id: &str, allowed: bool) -> Result<bool, StoreError> {
        let mut state = self.state.lock().unwrap();
        let changed = if allowed {
            state.mcp_nodes.insert(node_id.to_string())
        } else {
            state.mcp_nodes.remove(node_id)
        };
        if changed && let Err(e) = self.save(&state) {
            if allowed {
                state.mcp_nodes.remove(node_id);
            } else {
                state.mcp_nodes.insert(node_id.to_string());
            }
            return Err(e);
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_is_first_come_durable_and_forgettable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let s = FileStore::open(path.clone()).unwrap();
        let a = s.bind_node("n1", "AA").unwrap();
        assert_eq!(a.public_key, "aa");
        assert_eq!(
            s.bind_node("n1", "aa").unwrap(),
            a,
            "same key: same binding"
        );
        assert!(matches!(
            s.bind_node("n1", "bb"),
            Err(StoreError::BoundElsewhere { .. })
        ));
        // Survives a restart.
        let s = FileStore::open(path.clone()).unwrap();
        assert_eq!(s.node_identity("n1"), Some(a.clone()));
        assert!(s.is_current("n1", &a.binding));
        assert!(!s.is_current("n1", "other"));
        assert!(s.forget_node("n1").unwrap());
        assert!(!s.is_current("n1", &a.binding));
        assert!(!s.forget_node("n1").unwrap());
        let b = s.bind_node("n1", "aa").unwrap();
        assert_ne!(b.binding, a.binding, "a new binding voids old tokens");
        assert_eq!(FileStore::open(path).unwrap().node_identity("n1"), Some(b));
    }

    #[test]
    fn desired_configurations_are_durable_and_go_with_their_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let cfg: crate::protocol::NodeConfig =
            serde_json::from_value(serde_json::json!({"config_version": "v7"})).unwrap();
        {
            let s = FileStore::open(path.clone()).unwrap();
            s.bind_node("n1", "key").unwrap();
            s.set_desired_config("n1", Some(&cfg)).unwrap();
            s.set_desired_config("n2", Some(&cfg)).unwrap();
            s.set_desired_config("n2", None).unwrap();
        }
        let s = FileStore::open(path.clone()).unwrap();
        let kept = s.desired_configs();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (kept[0].0.as_str(), kept[0].1.config_version.as_str()),
            ("n1", "v7")
        );
        assert!(s.forget_node("n1").unwrap());
        assert!(FileStore::open(path).unwrap().desired_configs().is_empty());
    }

    #[test]
    fn the_mcp_allowlist_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let s = FileStore::open(path.clone()).unwrap();
        assert!(s.mcp_nodes().is_empty(), "none by default");
        assert!(s.set_mcp_node("a", true).unwrap());
        assert!(!s.set_mcp_node("a", true).unwrap());
        assert!(s.set_mcp_node("b", true).unwrap());
        assert!(s.set_mcp_node("b", false).unwrap());
        drop(s);
        assert_eq!(
            FileStore::open(path).unwrap().mcp_nodes(),
            vec!["a".to_string()]
        );
    }

    #[test]
    fn preview_grants_are_durable_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let s = FileStore::open(path.clone()).unwrap();
        let key = crate::server::preview::PreviewKey::new(b"k");
        let (g, _) = key.grant("w", 80, std::time::Duration::from_secs(60));
        s.add_preview(g.clone()).unwrap();
        let s = FileStore::open(path.clone()).unwrap();
        assert_eq!(s.preview(&g.id), Some(g.clone()));
        assert_eq!(s.previews(), vec![g.clone()]);
        assert!(s.revoke_preview(&g.id).unwrap());
        assert!(!s.revoke_preview(&g.id).unwrap());
        assert_eq!(FileStore::open(path).unwrap().preview(&g.id), None);
    }
}
