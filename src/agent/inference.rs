//! The node's inference backend as the configuration in force asks for it
//! (the engine side is `docker::inference`), and what the node reports
//! about it.

use super::Ctx;
use crate::docker::inference::{self as engine, Host};
use crate::protocol::InferenceStatus;

/// Makes the backend match the configuration in force (and the node's own
/// `inference` section, which has the last word) and records where it
/// stands. One at a time.
pub(crate) async fn converge(ctx: &Ctx) -> InferenceStatus {
    let _one = ctx.node.inference_lock.lock().await;
    let want = ctx
        .node
        .applied()
        .and_then(|a| a.config.inference_backend)
        .filter(|b| b.enabled);
    let id = &ctx.node.identity;
    let status = if !id.inference_enabled {
        // Whatever was pushed: the node does not run inference.
        let mut s =
            engine::ensure(&ctx.docker, &ctx.pool, &ctx.node_id, None, &Host::default()).await;
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
        };
        engine::ensure(&ctx.docker, &ctx.pool, &ctx.node_id, want.as_ref(), &host).await
    };
    ctx.node.set_inference(status.clone());
    status
}

/// Re-reads the backend's state; one that should run and does not (removed
/// behind the agent's back) is made again.
pub(crate) async fn refresh(ctx: &Ctx) {
    let was = ctx.node.inference();
    if was.image.is_none() {
        return; // none asked for
    }
    let (running, healthy, gpus) = engine::state(&ctx.docker, &ctx.node_id).await;
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
