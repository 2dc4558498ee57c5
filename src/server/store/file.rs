//! The single-machine store: a JSON file under the server's state
//! directory, read once at start and written atomically on every change.

use super::{McpToken, NodeIdentity, Store, StoreError};
use crate::server::orgs::{OperatorToken, Organization, RegistrationKey};
use crate::server::preview::PreviewGrant;
use std::path::PathBuf;
use std::sync::Mutex;

use super::state::State as FileState;

/// A JSON file under the server's state directory, written atomically
/// (0600) on every change; read once at start.
pub struct FileStore {
    path: PathBuf,
    state: Mutex<FileState>,
    /// `audit.jsonl` beside the state file.
    audit: crate::server::audit::AuditLog,
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
        let audit = crate::server::audit::AuditLog::new(
            path.with_file_name("audit.jsonl"),
            crate::server::audit::DEFAULT_MAX_BYTES,
        );
        Ok(FileStore {
            path,
            state: Mutex::new(state),
            audit,
        })
    }

    /// Applies `change` to a copy of the state, writes it, and keeps it
    /// only once written: a failed write changes nothing.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut FileState) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut state = self.state.lock().unwrap();
        let mut next = state.clone();
        let out = change(&mut next)?;
        self.save(&next)?;
        *state = next;
        Ok(out)
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
        self.state.lock().unwrap().node_identity(node_id)
    }

    fn bind_node(
        &self,
        node_id: &str,
        public_key: &str,
        org: &str,
    ) -> Result<NodeIdentity, StoreError> {
        let public_key = public_key.trim().to_ascii_lowercase();
        let mut state = self.state.lock().unwrap();
        if let Some(existing) = state.nodes.get(node_id) {
            let node_id = node_id.to_string();
            return if existing.public_key != public_key {
                Err(StoreError::BoundElsewhere { node_id })
            } else if existing.org != org {
                Err(StoreError::OtherOrganization { node_id })
            } else {
                Ok(existing.clone())
            };
        }
        let identity = NodeIdentity {
            public_key,
            binding: crate::server::auth::random_secret(12),
            bound_at: crate::server::orgs::now_rfc3339(),
            org: org.to_string(),
        };
        state.nodes.insert(node_id.to_string(), identity.clone());
        if let Err(e) = self.save(&state) {
            state.nodes.remove(node_id);
            return Err(e);
        }
        Ok(identity)
    }

    fn is_current(&self, node_id: &str, binding: &str) -> bool {
        self.state.lock().unwrap().is_current(node_id, binding)
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
        self.state.lock().unwrap().desired_configs()
    }

    fn desired_config(&self, node_id: &str) -> Option<crate::protocol::NodeConfig> {
        self.state.lock().unwrap().desired_config(node_id)
    }

    fn add_preview(&self, grant: PreviewGrant) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        let now = crate::server::preview::now_secs();
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
        self.state.lock().unwrap().preview(id)
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
        self.state.lock().unwrap().previews()
    }

    fn mcp_nodes(&self) -> Vec<String> {
        self.state.lock().unwrap().mcp_nodes()
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
        self.state.lock().unwrap().mcp_token_by_hash(hash)
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

    fn organizations(&self) -> Vec<Organization> {
        self.state.lock().unwrap().organizations()
    }

    fn add_organization(&self, org: Organization, key: RegistrationKey) -> Result<(), StoreError> {
        self.update(|s| {
            if crate::server::orgs::is_default(&org.name) || s.orgs.contains_key(&org.name) {
                return Err(StoreError::OrgExists(org.name.clone()));
            }
            s.orgs.insert(org.name.clone(), org);
            s.registration_keys.insert(key.id.clone(), key);
            Ok(())
        })
    }

    fn add_registration_key(&self, key: RegistrationKey) -> Result<(), StoreError> {
        self.update(|s| {
            s.check_org(&key.org)?;
            s.registration_keys.insert(key.id.clone(), key);
            Ok(())
        })
    }

    fn registration_key_by_hash(&self, hash: &str) -> Option<RegistrationKey> {
        self.state.lock().unwrap().registration_key_by_hash(hash)
    }

    fn add_operator_token(&self, token: OperatorToken) -> Result<(), StoreError> {
        self.update(|s| {
            s.check_org(&token.org)?;
            s.operator_tokens.insert(token.id.clone(), token);
            Ok(())
        })
    }

    fn operator_token_by_hash(&self, hash: &str) -> Option<OperatorToken> {
        self.state.lock().unwrap().operator_token_by_hash(hash)
    }

    fn operator_tokens(&self) -> Vec<OperatorToken> {
        self.state.lock().unwrap().operator_tokens()
    }

    fn revoke_operator_token(&self, id: &str) -> Result<bool, StoreError> {
        self.update(|s| Ok(s.operator_tokens.remove(id).is_some()))
    }

    fn remove_organization(&self, name: &str) -> Result<bool, StoreError> {
        if crate::server::orgs::is_default(name) {
            return Err(StoreError::DefaultOrg);
        }
        self.update(|s| {
            let nodes = s.nodes.values().filter(|n| n.org == name).count();
            if nodes > 0 {
                return Err(StoreError::OrgHasNodes {
                    org: name.to_string(),
                    nodes,
                });
            }
            s.registration_keys.retain(|_, k| k.org != name);
            s.operator_tokens.retain(|_, t| t.org != name);
            s.mcp_tokens.retain(|_, t| t.org.as_deref() != Some(name));
            Ok(s.orgs.remove(name).is_some())
        })
    }

    /// A file of its own beside `state.json` (0600), as operators know
    /// `admin.token`.
    fn secret(&self, name: &str, fresh: String) -> Result<String, StoreError> {
        let path = self.path.with_file_name(name);
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            _ => {
                crate::private_file::write(&path, &fresh)
                    .map_err(|source| StoreError::Io { path, source })?;
                Ok(fresh)
            }
        }
    }

    fn append_audit(&self, record: &crate::server::audit::AuditRecord) -> Result<(), StoreError> {
        self.audit.append(record).map_err(|source| StoreError::Io {
            path: self.path.with_file_name("audit.jsonl"),
            source,
        })
    }

    fn audit(
        &self,
        filter: &crate::server::audit::AuditFilter,
    ) -> Vec<crate::server::audit::AuditRecord> {
        self.audit.read(filter)
    }

    fn mcp_tokens(&self) -> Vec<McpToken> {
        self.state.lock().unwrap().mcp_tokens()
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
        let a = s.bind_node("n1", "AA", "default").unwrap();
        assert_eq!(a.public_key, "aa");
        assert_eq!(
            s.bind_node("n1", "aa", "default").unwrap(),
            a,
            "same key: same binding"
        );
        assert!(matches!(
            s.bind_node("n1", "bb", "default"),
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
        let b = s.bind_node("n1", "aa", "default").unwrap();
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
            s.bind_node("n1", "key", "default").unwrap();
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
    fn organizations_keys_and_tokens_are_durable_and_hashed() {
        use crate::server::orgs::{new_id, now_rfc3339, secret_hash};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let s = FileStore::open(path.clone()).unwrap();
        let org = Organization {
            name: "acme".into(),
            created_at: now_rfc3339(),
        };
        let key = RegistrationKey {
            id: new_id(),
            org: "acme".into(),
            hash: secret_hash("reg-secret"),
            created_at: now_rfc3339(),
        };
        s.add_organization(org.clone(), key.clone()).unwrap();
        assert!(matches!(
            s.add_organization(org.clone(), key.clone()),
            Err(StoreError::OrgExists(_))
        ));
        let default = Organization {
            name: "default".into(),
            created_at: now_rfc3339(),
        };
        assert!(matches!(
            s.add_organization(default, key.clone()),
            Err(StoreError::OrgExists(_))
        ));
        let token = OperatorToken {
            id: new_id(),
            org: "acme".into(),
            hash: secret_hash("op-secret"),
            created_at: now_rfc3339(),
            expires: None,
        };
        s.add_operator_token(token.clone()).unwrap();
        let stray = OperatorToken {
            org: "nope".into(),
            ..token.clone()
        };
        assert!(matches!(
            s.add_operator_token(stray),
            Err(StoreError::NoSuchOrg(_))
        ));
        // A node keeps the organization it registered in.
        s.bind_node("n1", "aa", "acme").unwrap();
        assert!(matches!(
            s.bind_node("n1", "aa", "default"),
            Err(StoreError::OtherOrganization { .. })
        ));
        let s = FileStore::open(path.clone()).unwrap();
        assert_eq!(s.organizations(), vec![org]);
        assert_eq!(
            s.registration_key_by_hash(&secret_hash("reg-secret")),
            Some(key)
        );
        assert_eq!(
            s.operator_token_by_hash(&secret_hash("op-secret")),
            Some(token.clone())
        );
        assert_eq!(s.node_identity("n1").unwrap().org, "acme");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("op-secret") && !text.contains("reg-secret"));
        assert!(s.revoke_operator_token(&token.id).unwrap());
        assert!(!s.revoke_operator_token(&token.id).unwrap());
        assert_eq!(FileStore::open(path).unwrap().operator_tokens(), vec![]);
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
