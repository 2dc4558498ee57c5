//! Versioned configuration pushed by the orchestrator (`configure`):
//! validated, written atomically under the state directory (0600: it holds
//! pull credentials), rolled back if applying fails, acknowledged with the
//! effective configuration hash, and reloaded when the agent starts.

use super::node::NodeState;
use super::policy::Policy;
use crate::config;
use crate::protocol::{
    AckErrorKind, AckStatus, ConfigAck, ConfigAckError, ErrorBody, ErrorCode, NodeConfig,
};
use sha2::Digest;
use std::path::{Path, PathBuf};

/// The configuration in force and what it implies.
#[derive(Debug, Clone)]
pub(crate) struct Applied {
    pub config: NodeConfig,
    /// The orchestrator's policy; the node's own policy is checked first.
    pub policy: Policy,
    pub hash: String,
}

pub(crate) fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("node-config.json")
}

/// Hash of a configuration with its secrets left out.
pub(crate) fn hash(cfg: &NodeConfig) -> String {
    let mut redacted = cfg.clone();
    for r in &mut redacted.registries {
        r.password = String::new();
    }
    let v = serde_json::to_value(&redacted).expect("configs serialize");
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))
}

/// Checks a pushed configuration; returns the orchestrator policy it implies.
pub(crate) fn interpret(cfg: &NodeConfig) -> Result<Policy, String> {
    if cfg.version != 1 {
        return Err(format!("version must be 1, got {}", cfg.version));
    }
    // Written as generated (upper case): versions are compared as strings.
    if cfg
        .config_version
        .parse::<ulid::Ulid>()
        .map_or(true, |u| u.to_string() != cfg.config_version)
    {
        return Err(format!(
            "config_version {:?} is not a ULID in upper case",
            cfg.config_version
        ));
    }
    for r in &cfg.registries {
        if r.server.trim().is_empty() {
            return Err("every registry needs a server".into());
        }
    }
    // What the orchestrator does not say, it does not restrict: start from
    // a fully permissive policy and overlay what it sent.
    let permissive = config::Sandbox {
        mounts: config::Mounts {
            allowed_host_paths: vec!["/".into()],
            read_only_by_default: true,
            force_read_only: false,
        },
        security: config::Security {
            allow_privileged: true,
            allow_host_network: true,
            allow_device_mounts: true,
        },
        ..Default::default()
    };
    let mut merged = serde_json::to_value(&permissive).expect("policies serialize");
    if let Some(v) = &cfg.policy.sandbox {
        overlay(&mut merged, v);
    }
    let sandbox: config::Sandbox =
        serde_json::from_value(merged).map_err(|e| format!("policy.sandbox: {e}"))?;
    if !["allow", "sandbox_only", "disabled"].contains(&sandbox.mode.as_str()) {
        return Err(format!(
            "policy.sandbox.mode: must be allow, sandbox_only or disabled, got {:?}",
            sandbox.mode
        ));
    }
    if let Err(e) = sandbox
        .default_network_policy
        .parse::<crate::protocol::NetworkPolicy>()
    {
        return Err(format!("policy.sandbox.default_network_policy: {e}"));
    }
    for d in &sandbox.allowed_egress_domains {
        crate::egress_proxy::Pattern::parse(d)
            .map_err(|e| format!("policy.sandbox.allowed_egress_domains: {e}"))?;
    }
    let mut policy = Policy::from_file(&sandbox);
    policy.source = "orchestrator";
    if let Some(t) = cfg.constraints.max_job_timeout_seconds {
        policy.max_timeout_secs = match policy.max_timeout_secs {
            0 => t,
            m => m.min(t),
        };
    }
    Ok(policy)
}

/// Deep-merges `top` over `base` (objects key by key, anything else replaced).
fn overlay(base: &mut serde_json::Value, top: &serde_json::Value) {
    match (base, top) {
        (serde_json::Value::Object(b), serde_json::Value::Object(t)) => {
            for (k, v) in t {
                match b.get_mut(k) {
                    Some(slot) => overlay(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, t) => *b = t.clone(),
    }
}

/// Loads the configuration applied before a restart, if any.
pub(crate) fn load(state_dir: &Path) -> Option<Applied> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    let config: NodeConfig = serde_json::from_str(&text).ok()?;
    let policy = interpret(&config).ok()?;
    Some(Applied {
        hash: hash(&config),
        policy,
        config,
    })
}

async fn write_atomic(path: &Path, cfg: &NodeConfig) -> std::io::Result<()> {
    crate::private_file::store(
        path.to_path_buf(),
        serde_json::to_string_pretty(cfg).expect("configs serialize"),
    )
    .await
}

/// Applies a pushed configuration; stale versions are refused.
pub(crate) async fn apply(
    node: &NodeState,
    docker: &bollard::Docker,
    new: NodeConfig,
) -> Result<ConfigAck, ErrorBody> {
    // One push at a time, from the version check to the new state: two
    // overlapping pushes (an operator's and a poll's) could otherwise both
    // pass the check and leave the older one in force.
    let _one_at_a_time = node.configuring.lock().await;
    let previous = node.applied();
    if let Some(p) = &previous
        && new.config_version <= p.config.config_version
    {
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!(
                "config_version {} is not newer than the applied {}: ignored",
                new.config_version, p.config.config_version
            ),
        ));
    }
    let current_hash = previous
        .as_ref()
        .map(|p| p.hash.clone())
        .unwrap_or_default();
    let version = new.config_version.clone();
    let ack = |status: AckStatus, error: Option<(AckErrorKind, String)>, hash: String| ConfigAck {
        config_version: version.clone(),
        status,
        error: error.map(|(kind, message)| ConfigAckError { kind, message }),
        effective_config_hash: hash,
        inference: None,
    };
    // 1. Validate: nothing changes on failure.
    let policy = match interpret(&new) {
        Ok(p) => p,
        Err(e) => {
            return Ok(ack(
                AckStatus::Failed,
                Some((AckErrorKind::Invalid, e)),
                current_hash,
            ));
        }
    };
    // A default image or an inference backend either policy forbids is
    // refused before anything is pulled: a push must not make the node
    // fetch or run what it would not run for a worker.
    let backend = new
        .inference_backend
        .as_ref()
        .filter(|b| b.enabled)
        .map(|b| ("inference_backend.image", b.image()));
    let images = policy
        .default_image
        .as_deref()
        .map(|i| ("default_image", i))
        .into_iter()
        .chain(backend);
    for (what, image) in images {
        if let Some(p) = [&node.policy, &policy]
            .into_iter()
            .find(|p| !p.image_allowed(image))
        {
            let msg = format!(
                "{what} {image:?} is not in the {} policy's allowed_images",
                p.source
            );
            return Ok(ack(
                AckStatus::Failed,
                Some((AckErrorKind::Invalid, msg)),
                current_hash,
            ));
        }
    }
    // 2. Write it (temporary file, then rename).
    let file = path(&node.state_dir);
    if let Err(e) = write_atomic(&file, &new).await {
        return Ok(ack(
            AckStatus::Failed,
            Some((AckErrorKind::Storage, e.to_string())),
            current_hash,
        ));
    }
    // 3. Apply what needs the runtime; on failure restore the previous file.
    if let Some(image) = &policy.default_image
        && let Err(e) = crate::docker::containers::ensure_image(docker, image, None).await
    {
        let restored = match &previous {
            Some(p) => write_atomic(&file, &p.config).await,
            None => tokio::fs::remove_file(&file).await,
        };
        if let Err(r) = restored {
            tracing::error!(error = %r, "could not restore the previous configuration file");
        }
        return Ok(ack(
            AckStatus::RolledBack,
            Some((AckErrorKind::Apply, ErrorBody::from(e).message)),
            current_hash,
        ));
    }
    let applied = Applied {
        hash: hash(&new),
        policy,
        config: new,
    };
    let h = applied.hash.clone();
    tracing::info!(config_version = %applied.config.config_version, hash = %h, "configuration applied");
    node.set_applied(applied);
    Ok(ack(AckStatus::Applied, None, h))
}
