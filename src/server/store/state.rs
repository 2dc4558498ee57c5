//! What both stores hold in memory: the SQLite store all of its state, the
//! PostgreSQL store its copy of the database. The reads are written once,
//! here.

use super::{McpToken, NodeIdentity, StoreError};
use crate::server::auth::secret_eq;
use crate::server::orgs::{OperatorToken, Organization, RegistrationKey, is_default};
use crate::server::preview::PreviewGrant;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Default, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    /// The format's version of a `state.json` (imported by the SQLite store).
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeIdentity>,
    #[serde(default)]
    pub previews: BTreeMap<String, PreviewGrant>,
    #[serde(default)]
    pub mcp_nodes: BTreeSet<String>,
    #[serde(default)]
    pub mcp_tokens: BTreeMap<String, McpToken>,
    /// The configuration pushed to each node (it may hold registry
    /// credentials: the file is 0600, as the server's other secrets).
    #[serde(default)]
    pub desired_configs: BTreeMap<String, crate::protocol::NodeConfig>,
    #[serde(default)]
    pub orgs: BTreeMap<String, Organization>,
    /// By id.
    #[serde(default)]
    pub registration_keys: BTreeMap<String, RegistrationKey>,
    /// By id.
    #[serde(default)]
    pub operator_tokens: BTreeMap<String, OperatorToken>,
    /// Deployment name → the node it was made on.
    #[serde(default)]
    pub deployments: BTreeMap<String, String>,
}

impl State {
    pub fn check_org(&self, org: &str) -> Result<(), StoreError> {
        if is_default(org) || self.orgs.contains_key(org) {
            Ok(())
        } else {
            Err(StoreError::NoSuchOrg(org.to_string()))
        }
    }

    pub fn node_identity(&self, node_id: &str) -> Option<NodeIdentity> {
        self.nodes.get(node_id).cloned()
    }

    pub fn is_current(&self, node_id: &str, binding: &str) -> bool {
        self.nodes
            .get(node_id)
            .is_some_and(|i| i.binding == binding)
    }

    pub fn desired_configs(&self) -> Vec<(String, crate::protocol::NodeConfig)> {
        self.desired_configs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn desired_config(&self, node_id: &str) -> Option<crate::protocol::NodeConfig> {
        self.desired_configs.get(node_id).cloned()
    }

    pub fn deployment_node(&self, name: &str) -> Option<String> {
        self.deployments.get(name).cloned()
    }

    /// The deployments made on `node_id`.
    pub fn deployments_of(&self, node_id: &str) -> Vec<String> {
        self.deployments
            .iter()
            .filter(|(_, n)| *n == node_id)
            .map(|(d, _)| d.clone())
            .collect()
    }

    pub fn preview(&self, id: &str) -> Option<PreviewGrant> {
        self.previews.get(id).cloned()
    }

    /// Grants not yet expired.
    pub fn previews(&self) -> Vec<PreviewGrant> {
        let now = crate::server::preview::now_secs();
        self.previews
            .values()
            .filter(|g| g.expires > now)
            .cloned()
            .collect()
    }

    pub fn mcp_nodes(&self) -> Vec<String> {
        self.mcp_nodes.iter().cloned().collect()
    }

    pub fn mcp_tokens(&self) -> Vec<McpToken> {
        self.mcp_tokens.values().cloned().collect()
    }

    pub fn mcp_token_by_hash(&self, hash: &str) -> Option<McpToken> {
        by_hash(self.mcp_tokens.values(), hash, |t| &t.hash)
    }

    pub fn organizations(&self) -> Vec<Organization> {
        self.orgs.values().cloned().collect()
    }

    pub fn registration_key_by_hash(&self, hash: &str) -> Option<RegistrationKey> {
        by_hash(self.registration_keys.values(), hash, |k| &k.hash)
    }

    pub fn operator_token_by_hash(&self, hash: &str) -> Option<OperatorToken> {
        by_hash(self.operator_tokens.values(), hash, |t| &t.hash)
    }

    pub fn operator_tokens(&self) -> Vec<OperatorToken> {
        self.operator_tokens.values().cloned().collect()
    }
}

/// The item whose kept digest is `hash`, compared in constant time.
fn by_hash<'a, T: Clone + 'a>(
    items: impl Iterator<Item = &'a T>,
    hash: &str,
    digest: impl Fn(&T) -> &str,
) -> Option<T> {
    items
        .into_iter()
        .find(|t| secret_eq(digest(t), hash))
        .cloned()
}
