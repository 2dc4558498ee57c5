//! The node's inference backend as the configuration in force asks for it
//! (the engine side is `docker::inference`), and what the node reports
//! about it.

use super::Ctx;
use crate::docker::inference::{self as engine, Host};
use crate::protocol::InferenceStatus;
use std::sync::Arc;

/// Makes the backend match the configuration in force (and the node's own
/// `inference` section, which has the last word) and records where it
/// stands. One at a time.
pub(crate) async fn converge(ctx: &Arc<Ctx>) -> InferenceStatus {
    let _one = ctx.node.inference_lock.lock().await;
    let pushed = ctx
        .node
        .applied()
        .and_then(|a| a.config.inference_backend)
        .filter(|b| b.enabled);
    // The node's policy as it is now, not as it was when the backend was
    // pushed: a node file tightened since (and the agent restarted) has
    // the last word over a stored configuration too.
    let (want, forbidden) = match pushed {
        Some(b) if !ctx.node.policy.image_allowed(b.image()) => {
            let why = format!(
                "inference_backend.image {:?} is not in the {} policy's allowed_images",
                b.image(),
                ctx.node.policy.source
            );
            (None, Some(why))
        }
        b => (b, None),
    };
    let id = &ctx.node.identity;
    let mut status = if !id.inference_enabled {
        // Whatever was pushed: the node does not run inference.
        let mut s = engine::ensure(
            &ctx.engine.docker,
            &ctx.engine.pool,
            &ctx.engine.node_id,
            None,
            &Host::default(),
        )
        .await;
        s.supported = false;
        if want.is_some() {
            s.note = Some(
                "the node does not allow inference (its inference.mode is not allow, or its sandbox.mode is sandbox_only)".into(),
            );
        }
        s
    } else {
        let gpu = super::capabilities::gpus().await;
        let count = |vendor: &str| {
            gpu.devices
                .iter()
                .filter(|d| d.vendor.to_ascii_lowercase().contains(vendor))
                .count() as u32
        };
        let host = Host {
            helper_image: ctx.node.egress_image.clone(),
            allow_gpu: id.inference_allow_gpu,
            nvidia: count("nvidia"),
            amd: count("amd"),
            max_concurrency: id.inference_max_concurrency,
            max_body_bytes: id.inference_max_body_bytes,
            timeout_secs: id.inference_timeout_secs,
            credentials: want.as_ref().and_then(|b| ctx.node.credentials(b.image())),
        };
        engine::ensure(
            &ctx.engine.docker,
            &ctx.engine.pool,
            &ctx.engine.node_id,
            want.as_ref(),
            &host,
        )
        .await
    };
    if let Some(why) = forbidden {
        tracing::warn!(reason = %why, "the pushed inference backend is not run");
        status.note = Some(why);
    }
    let models = want.map(|b| b.models).unwrap_or_default();
    if status.running && status.healthy {
        for m in &models {
            status.models.insert(m.clone(), "pulling".into());
        }
    }
    ctx.node.set_inference(status.clone());
    if !status.models.is_empty() {
        ctx.spawn(pull_models(ctx.clone(), models));
    }
    status
}

/// Pulls the configured models one after the other, each one's state in
/// the report as it changes.
async fn pull_models(ctx: Arc<Ctx>, models: Vec<String>) {
    for m in models {
        let r = engine::pull(&ctx.engine.docker, &ctx.engine.node_id, &m).await;
        let state = match &r {
            Ok(()) => "ready".to_string(),
            Err(why) => format!("failed: {why}"),
        };
        match r {
            Ok(()) => tracing::info!(model = %m, "model pulled"),
            Err(why) => tracing::warn!(model = %m, error = %why, "model pull failed"),
        }
        let mut s = ctx.node.inference();
        if let Some(v) = s.models.get_mut(&m) {
            *v = state;
            ctx.node.set_inference(s);
            super::health::report_capabilities(&ctx).await;
        }
    }
}

/// Re-reads the backend's state; one that should run and does not (removed
/// behind the agent's back) is made again, and one left in a restarted
/// gateway's old namespace is restarted into the new one.
pub(crate) async fn refresh(ctx: &Arc<Ctx>) {
    let was = ctx.node.inference();
    if was.image.is_none() {
        return; // none asked for
    }
    // Not while a configuration replaces the pair.
    let rejoined = {
        let _one = ctx.node.inference_lock.lock().await;
        engine::rejoin(&ctx.engine.docker, &ctx.engine.node_id).await
    };
    match rejoined {
        Ok(true) => tracing::warn!(
            "the inference gateway restarted after the backend: backend restarted into its namespace"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "could not check the inference backend's namespace"),
    }
    let (running, healthy, gpus) = engine::state(&ctx.engine.docker, &ctx.engine.node_id).await;
    if !running {
        converge(ctx).await;
        return;
    }
    ctx.node.set_inference(InferenceStatus {
        running,
        healthy,
        gpus,
        ..was
    });
}
