//! Replicas on one database (`tether server --database`): each records, on
//! a lease, the URL it answers at and the nodes whose agent connections it
//! holds. An operator request that reaches a replica without the node it
//! names is forwarded to the replica that holds it (`api/forward.rs`); the
//! database carries only these records and small notifications, never
//! stream bytes.

use super::AppState;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a replica's records hold without renewal: a replica that dies
/// is forgotten this long after its last renewal.
pub const LEASE: Duration = Duration::from_secs(15);

/// How often a replica renews its records (and at once when an agent
/// connects or goes).
pub const RENEW: Duration = Duration::from_secs(5);

/// Set on a request one replica forwards to another: the receiver answers
/// it from what it holds and never forwards it again.
pub const FORWARDED: &str = "x-tether-forwarded";

/// This replica, when the server runs on a database.
pub struct Replica {
    pub id: String,
    /// Where the other replicas reach this one.
    pub url: String,
    /// Shared by every replica (in the database): authorizes their
    /// questions to each other (`/internal/v1/holds`).
    pub key: String,
    /// Woken when an agent connects or goes, to renew at once.
    pub changed: tokio::sync::Notify,
    /// Asks the other replicas (their `https://` URLs verified with the
    /// web's roots and `--replica-ca`).
    pub http: reqwest::Client,
    /// Opens TLS to a replica whose URL is `https://`, for requests passed
    /// on as they came (`api/forward.rs`).
    pub tls: tokio_rustls::TlsConnector,
}

impl Replica {
    pub fn new(url: String, key: String, tls: rustls::ClientConfig) -> Replica {
        Replica {
            id: ulid::Ulid::new().to_string().to_ascii_lowercase(),
            url,
            key,
            changed: tokio::sync::Notify::new(),
            // Never to anywhere but the replica asked: no proxy from the
            // environment, no redirect (a request carries the replicas' key
            // and a caller's token).
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .use_preconfigured_tls(tls.clone())
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .expect("a client with a preconfigured TLS config always builds"),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        }
    }
}

/// Renews this replica's lease and the list of nodes it holds until `stop`.
pub(crate) async fn run(app: Arc<AppState>, stop: CancellationToken) {
    let Some(replica) = app.replica.as_ref() else {
        return;
    };
    loop {
        let held: Vec<String> = app
            .hub
            .nodes()
            .into_iter()
            .filter(|n| n.status != crate::protocol::operator::NodeState::Offline)
            .map(|n| n.node_id)
            .collect();
        let (store, id, url) = (app.store.clone(), replica.id.clone(), replica.url.clone());
        let r =
            tokio::task::spawn_blocking(move || store.hold_nodes(&id, &url, &held, LEASE)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "could not renew this replica's lease");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RENEW) => {}
            _ = replica.changed.notified() => {}
        }
    }
}
