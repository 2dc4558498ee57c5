//! The PostgreSQL store's connection and its copy of the tables: the
//! connection made (and made again), `LISTEN`, and the rows a write or a
//! notification names read into the copy.

use super::{Slot, db, schema::migrate};
use crate::server::orgs::{OperatorToken, Organization, RegistrationKey};
use crate::server::store::{NodeIdentity, StoreError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio_postgres::{Client, NoTls};

/// How the connection is made: in the clear, or TLS (`sslmode=require`,
/// `verify-ca` or `verify-full` in the URL) verified against the web's
/// roots and the operator's CA bundle. A certificate that does not verify
/// ends the attempt: there is no silent fallback to the clear.
#[derive(Clone)]
pub(crate) struct Target {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Target {
    pub(crate) fn new(url: &str, ca: Option<&std::path::Path>) -> Result<Target, StoreError> {
        // libpq's verifying modes: TLS is required and the certificate
        // verified, as `require` is here.
        let url = url
            .replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require");
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Db(format!("the database URL: {}", crate::error_chain(&e))))?;
        let tls = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Require => {
                let rustls = crate::tls_client_config_with(ca, None).map_err(StoreError::Db)?;
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(rustls))
            }
            _ if ca.is_some() => {
                return Err(StoreError::Db(
                    "a database CA is given but the URL does not ask for TLS (add sslmode=require)"
                        .into(),
                ));
            }
            _ => None,
        };
        Ok(Target { config, tls })
    }

    /// A connection; its messages (notifications) go to `tx` until it
    /// fails, then `lost` fires.
    async fn connect(
        &self,
        tx: tokio::sync::mpsc::UnboundedSender<String>,
        lost: tokio::sync::oneshot::Sender<()>,
    ) -> Result<Client, StoreError> {
        match &self.tls {
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await.map_err(db)?;
                tokio::spawn(watch(conn, tx, lost));
                Ok(client)
            }
            None => {
                let (client, conn) = self.config.connect(NoTls).await.map_err(db)?;
                tokio::spawn(watch(conn, tx, lost));
                Ok(client)
            }
        }
    }
}

/// Reads a connection's messages: notifications name a table to read
/// again. `lost` fires when the connection fails.
async fn watch<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
    lost: tokio::sync::oneshot::Sender<()>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let mut messages = futures_util::stream::poll_fn(|cx| conn.poll_message(cx));
    while let Some(m) = messages.next().await {
        match m {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                let _ = tx.send(n.payload().to_string());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "database connection failed");
                break;
            }
        }
    }
    let _ = lost.send(());
}

pub(super) const CHANNEL: &str = "tether_changed";

/// What reads are served from: the database's rows, refreshed on writes
/// and notifications.
pub(super) type Cache = crate::server::store::state::State;

/// The tables the cache holds.
pub(super) const TABLES: &[&str] = &[
    "nodes",
    "orgs",
    "registration_keys",
    "operator_tokens",
    "previews",
    "mcp_nodes",
    "mcp_tokens",
    "desired_configs",
    "deployments",
];

/// Waits between attempts to make a lost connection again.
const RECONNECT_MIN: std::time::Duration = std::time::Duration::from_millis(200);
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Makes the connection, and makes it again whenever it is lost; the
/// first outcome goes to `first` (a first failure ends it).
pub(super) async fn keep_connected(
    target: Target,
    cache: Arc<Mutex<Cache>>,
    slot: Slot,
    first: std::sync::mpsc::Sender<Result<(), StoreError>>,
) {
    let mut first = Some(first);
    let mut wait = RECONNECT_MIN;
    loop {
        match open(&target, &cache).await {
            Ok((client, lost)) => {
                *slot.lock().unwrap() = Some(client);
                wait = RECONNECT_MIN;
                match first.take() {
                    Some(f) => {
                        let _ = f.send(Ok(()));
                    }
                    None => tracing::info!("database connection made again"),
                }
                let _ = lost.await;
                *slot.lock().unwrap() = None;
                tracing::error!("database connection lost; making it again");
            }
            Err(e) => {
                if let Some(f) = first.take() {
                    let _ = f.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, "could not reach the database; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// One connection: migrated, listening, the cache read afresh. The
/// receiver fires when the connection is lost.
pub(super) async fn open(
    target: &Target,
    cache: &Arc<Mutex<Cache>>,
) -> Result<(Arc<Client>, tokio::sync::oneshot::Receiver<()>), StoreError> {
    let (lost_tx, lost) = tokio::sync::oneshot::channel();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let client = Arc::new(target.connect(tx, lost_tx).await?);
    migrate(&client).await?;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(db)?;
    // Whatever changed while there was no connection is read here.
    for t in TABLES {
        reload(&client, cache, t, None).await?;
    }
    let (c, cache) = (client.clone(), cache.clone());
    tokio::spawn(async move {
        while let Some(payload) = rx.recv().await {
            let (table, key) = match payload.split_once('\t') {
                Some((t, k)) => (t, Some(k)),
                None => (payload.as_str(), None),
            };
            if let Err(e) = reload(&c, &cache, table, key).await {
                tracing::warn!(%table, error = %e, "could not read a changed table");
            }
        }
    });
    Ok((client, lost))
}

/// Tells every replica that `table` changed: the row `key`, or any rows.
/// The payload is `table` or `table<TAB>key`.
pub(super) async fn notify(c: &Client, table: &str, key: Option<&str>) -> Result<(), StoreError> {
    let payload = match key {
        Some(k) => format!("{table}\t{k}"),
        None => table.to_string(),
    };
    c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await
        .map_err(db)?;
    Ok(())
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(
    v: serde_json::Value,
) -> Result<T, StoreError> {
    serde_json::from_value(v).map_err(|e| StoreError::Db(format!("a stored value: {e}")))
}

/// The query that reads a table for the cache, and its key column.
fn select(table: &str) -> Option<(&'static str, &'static str)> {
    Some(match table {
        "nodes" => (
            "SELECT node_id, public_key, binding, bound_at, org FROM nodes",
            "node_id",
        ),
        "orgs" => ("SELECT name, created_at FROM orgs", "name"),
        "registration_keys" => (
            "SELECT id, org, hash, created_at FROM registration_keys",
            "id",
        ),
        "operator_tokens" => (
            "SELECT id, org, hash, created_at, expires FROM operator_tokens",
            "id",
        ),
        "previews" => ("SELECT id, grant_ FROM previews", "id"),
        "mcp_nodes" => ("SELECT node_id FROM mcp_nodes", "node_id"),
        "mcp_tokens" => ("SELECT id, token FROM mcp_tokens", "id"),
        "desired_configs" => ("SELECT node_id, config FROM desired_configs", "node_id"),
        "deployments" => ("SELECT name, node_id FROM deployments", "name"),
        _ => return None,
    })
}

/// Puts what was read into one of the cache's maps: the row `key` (gone
/// if nothing was read), or the whole table.
fn put<V>(map: &mut BTreeMap<String, V>, key: Option<&str>, rows: Vec<(String, V)>) {
    match key {
        Some(k) => {
            map.remove(k);
        }
        None => map.clear(),
    }
    map.extend(rows);
}

/// Reads one row (`key`) or all of a table into the cache: a write
/// notifies the row it changed, so a replica with many nodes reads one row
/// per registration, not every node.
pub(super) async fn reload(
    c: &Client,
    cache: &Mutex<Cache>,
    table: &str,
    key: Option<&str>,
) -> Result<(), StoreError> {
    let Some((sql, key_column)) = select(table) else {
        return Ok(());
    };
    let rows = match key {
        Some(k) => {
            let sql = format!("{sql} WHERE {key_column} = $1");
            c.query(&sql, &[&k]).await.map_err(db)?
        }
        None => c.query(sql, &[]).await.map_err(db)?,
    };
    let text = |r: &tokio_postgres::Row, i: usize| -> String { r.get(i) };
    let mut cache = cache.lock().unwrap();
    match table {
        "nodes" => {
            let rows = rows
                .iter()
                .map(|r| {
                    let identity = NodeIdentity {
                        public_key: r.get(1),
                        binding: r.get(2),
                        bound_at: r.get(3),
                        org: r.get(4),
                    };
                    (text(r, 0), identity)
                })
                .collect();
            put(&mut cache.nodes, key, rows);
        }
        "orgs" => {
            let rows = rows
                .iter()
                .map(|r| {
                    let org = Organization {
                        name: r.get(0),
                        created_at: r.get(1),
                    };
                    (org.name.clone(), org)
                })
                .collect();
            put(&mut cache.orgs, key, rows);
        }
        "registration_keys" => {
            let rows = rows
                .iter()
                .map(|r| {
                    let k = RegistrationKey {
                        id: r.get(0),
                        org: r.get(1),
                        hash: r.get(2),
                        created_at: r.get(3),
                    };
                    (k.id.clone(), k)
                })
                .collect();
            put(&mut cache.registration_keys, key, rows);
        }
        "operator_tokens" => {
            let rows = rows
                .iter()
                .map(|r| {
                    let t = OperatorToken {
                        id: r.get(0),
                        org: r.get(1),
                        hash: r.get(2),
                        created_at: r.get(3),
                        expires: r.get::<_, Option<i64>>(4).map(|e| e.max(0) as u64),
                    };
                    (t.id.clone(), t)
                })
                .collect();
            put(&mut cache.operator_tokens, key, rows);
        }
        "previews" => {
            let rows = rows
                .iter()
                .map(|r| Ok((text(r, 0), from_json(r.get(1))?)))
                .collect::<Result<_, StoreError>>()?;
            put(&mut cache.previews, key, rows);
        }
        "mcp_nodes" => {
            match key {
                Some(k) => {
                    cache.mcp_nodes.remove(k);
                }
                None => cache.mcp_nodes.clear(),
            }
            cache.mcp_nodes.extend(rows.iter().map(|r| text(r, 0)));
        }
        "mcp_tokens" => {
            let rows = rows
                .iter()
                .map(|r| Ok((text(r, 0), from_json(r.get(1))?)))
                .collect::<Result<_, StoreError>>()?;
            put(&mut cache.mcp_tokens, key, rows);
        }
        "desired_configs" => {
            let rows = rows
                .iter()
                .map(|r| Ok((text(r, 0), from_json(r.get(1))?)))
                .collect::<Result<_, StoreError>>()?;
            put(&mut cache.desired_configs, key, rows);
        }
        "deployments" => {
            let rows = rows.iter().map(|r| (text(r, 0), text(r, 1))).collect();
            put(&mut cache.deployments, key, rows);
        }
        _ => {}
    }
    Ok(())
}
