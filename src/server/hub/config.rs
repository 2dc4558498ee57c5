//! Desired configuration per node: pushed, re-pushed on reconnect and on
//! a node's poll.

use super::*;

impl Hub {
    /// Pushes configuration to a node and returns its acknowledgement. A
    /// missing `config_version` gets a fresh ULID. The configuration is kept
    /// and pushed again when the node reconnects with an older version.
    pub async fn push_config(
        &self,
        node_id: &str,
        mut cfg: crate::protocol::NodeConfig,
    ) -> Result<crate::protocol::ConfigAck, ErrorBody> {
        if cfg.config_version.is_empty() {
            cfg.config_version = ulid::Ulid::new().to_string();
        }
        self.node_info(node_id)?;
        {
            let mut reg = self.reg.lock().unwrap();
            if let Some(n) = reg.nodes.get_mut(node_id) {
                n.desired_config = Some(cfg.clone());
            }
        }
        let link = self.link(node_id)?;
        let ack: crate::protocol::ConfigAck = link.request_as(Request::Configure(cfg)).await?;
        let mut reg = self.reg.lock().unwrap();
        if let Some(n) = reg.nodes.get_mut(node_id) {
            if ack.status == crate::protocol::AckStatus::Applied {
                n.config_version = Some(ack.config_version.clone());
            }
            n.last_config_ack = Some(ack.clone());
        }
        Ok(ack)
    }

    /// Stages configuration for a node without pushing it: the node gets it
    /// when it polls (`updates.enable_dynamic_config`) or reconnects.
    pub fn set_desired_config(
        &self,
        node_id: &str,
        mut cfg: crate::protocol::NodeConfig,
    ) -> Result<String, ErrorBody> {
        if cfg.config_version.is_empty() {
            cfg.config_version = ulid::Ulid::new().to_string();
        }
        let mut reg = self.reg.lock().unwrap();
        let n = reg.nodes.get_mut(node_id).ok_or_else(|| {
            ErrorBody::new(ErrorCode::NotFound, format!("no such node: {node_id}"))
        })?;
        let version = cfg.config_version.clone();
        n.desired_config = Some(cfg);
        Ok(version)
    }

    /// Restores what a durable store kept: the configuration wanted on a
    /// node of organization `org` (its binding's), pushed when it connects
    /// behind it (the node is known, offline, until then). One older than
    /// what this hub already wants is ignored.
    pub fn restore_desired_config(
        &self,
        node_id: &str,
        org: &str,
        cfg: crate::protocol::NodeConfig,
    ) {
        self.node_link(node_id);
        if let Some(n) = self.reg.lock().unwrap().nodes.get_mut(node_id) {
            // Never the default organization's by omission: its operators
            // would see and steer another organization's offline node.
            n.org = org.to_string();
            if n.desired_config
                .as_ref()
                .is_none_or(|d| d.config_version < cfg.config_version)
            {
                n.desired_config = Some(cfg);
            }
        }
    }

    /// A node asks for newer configuration: push it if there is some.
    pub(crate) fn on_config_poll(&self, node_id: &str, applied: Option<String>) {
        let desired = self
            .reg
            .lock()
            .unwrap()
            .nodes
            .get(node_id)
            .and_then(|n| n.desired_config.clone());
        if let Some(cfg) = desired
            && applied
                .as_deref()
                .is_none_or(|v| v < cfg.config_version.as_str())
        {
            let (hub, node) = (self.clone(), node_id.to_string());
            self.spawn_task(async move {
                if let Err(e) = hub.push_config(&node, cfg).await {
                    tracing::debug!(node_id = %node, error = %e, "configuration push on poll failed");
                }
            });
        }
    }
}
