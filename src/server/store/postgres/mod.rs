//! The store in PostgreSQL (`tether server --database postgres://…`), so any
//! number of server replicas share one state. The schema is versioned and
//! migrated at start, one replica at a time (an advisory lock). Every write
//! goes to the database first; reads come from a copy in memory (a node's
//! binding is checked on every heartbeat tick), which each write refreshes
//! and which `NOTIFY tether_changed, '<table>\t<key>'` refreshes on every
//! other replica: the notification names the row, nothing more. The schema
//! is `schema.rs`; the connection and the copy are `sync.rs`.
//!
//! The client runs on a runtime of its own, on a thread of its own, so the
//! synchronous [`Store`] methods can wait for it from any thread.

use super::{Claim, McpToken, NodeIdentity, Store, StoreError};
use crate::server::audit::{AuditFilter, AuditRecord};
use crate::server::orgs::{OperatorToken, Organization, RegistrationKey, is_default};
use crate::server::preview::PreviewGrant;
use futures_util::future::BoxFuture;
use std::sync::{Arc, Mutex};
use tokio_postgres::Client;

mod schema;
mod sync;

use sync::{Cache, from_json, keep_connected, notify, reload};

pub struct PgStore {
    /// The live connection; none while it is being made again.
    client: Slot,
    cache: Arc<Mutex<Cache>>,
    rt: tokio::runtime::Handle,
    /// Audit records kept: older ones go as new ones come.
    audit_keep: i64,
    /// Node proofs to record, in batches (see [`record_proofs`]).
    proofs: tokio::sync::mpsc::UnboundedSender<ProofUse>,
    /// Ends the client's thread when the store is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// How often expired node proofs are removed.
const PROOF_SWEEP_MS: u64 = 10_000;

/// Most node proofs recorded by one statement.
const PROOF_BATCH: usize = 2_000;

/// A node proof to record; the answer says whether it was new.
struct ProofUse {
    digest: String,
    until_ms: i64,
    reply: tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
}

/// Audit records the database keeps by default (a few hundred MB); the
/// single-machine store's bound is its 16 MiB rotation.
pub const DEFAULT_AUDIT_KEEP: i64 = 1_000_000;

pub(super) type Slot = Arc<Mutex<Option<Arc<Client>>>>;

pub(super) fn db(e: tokio_postgres::Error) -> StoreError {
    StoreError::Db(crate::error_chain(&e))
}

type Job<T> = BoxFuture<'static, Result<T, StoreError>>;

impl PgStore {
    /// Connects, migrates the schema and loads the cache. A connection lost
    /// later is made again (with backoff) and the cache read afresh; until
    /// then writes fail `unavailable` and reads serve the last copy.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        PgStore::connect_with(url, None)
    }

    /// As [`PgStore::connect`]; `ca` is a PEM bundle trusted for the
    /// database's certificate besides the web's roots (TLS is used when the
    /// URL says `sslmode=require`, `verify-ca` or `verify-full`).
    pub fn connect_with(url: &str, ca: Option<&std::path::Path>) -> Result<PgStore, StoreError> {
        let target = sync::Target::new(url, ca)?;
        let (rt_tx, rt_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tether-postgres".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the database client");
                let _ = rt_tx.send(rt.handle().clone());
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| StoreError::Db(format!("cannot start the database thread: {e}")))?;
        let rt = rt_rx
            .recv()
            .map_err(|_| StoreError::Db("the database thread did not start".into()))?;
        let cache = Arc::new(Mutex::new(Cache::default()));
        let client: Slot = Arc::default();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        rt.spawn(keep_connected(
            target,
            cache.clone(),
            client.clone(),
            first_tx,
        ));
        let (proofs, queued) = tokio::sync::mpsc::unbounded_channel();
        rt.spawn(record_proofs(client.clone(), queued));
        first_rx
            .recv()
            .map_err(|_| StoreError::Db("the database thread has stopped".into()))??;
        Ok(PgStore {
            client,
            cache,
            rt,
            audit_keep: DEFAULT_AUDIT_KEEP,
            proofs,
            _stop: stop,
        })
    }

    /// Keeps at most `records` audit records (the newest).
    pub fn keep_audit(mut self, records: i64) -> PgStore {
        self.audit_keep = records.max(1);
        self
    }

    /// Runs `work` with the client on the database thread and waits for it.
    fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(Arc<Client>) -> Job<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let client =
            self.client.lock().unwrap().clone().ok_or_else(|| {
                StoreError::Db("the database connection is being made again".into())
            })?;
        wait(&self.rt, work(client))
    }

    /// Runs `sql` (a write), tells every replica what changed in `table`,
    /// and reads it again here. A write that touches one row names it by
    /// its first parameter (text); one whose first parameter is not text
    /// (a time bound) may touch many, and the table is read whole.
    fn write(
        &self,
        table: &'static str,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<u64, StoreError> {
        let cache = self.cache.clone();
        self.run(move |c| {
            Box::pin(async move {
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    params.iter().map(Param::as_sql).collect();
                let n = c.execute(sql, &refs).await.map_err(db)?;
                // A write's first parameter names its row, when it is text.
                let key = match params.first() {
                    Some(Param::Text(k)) => Some(k.as_str()),
                    _ => None,
                };
                notify(&c, table, key).await?;
                reload(&c, &cache, table, key).await?;
                Ok(n)
            })
        })
    }

    /// Writes `value` as the row of `key` (`put`: `$1` the key, `$2` the
    /// value), or with none deletes that row (`delete`: `$1` the key).
    fn put_or_delete(
        &self,
        table: &'static str,
        put: &'static str,
        delete: &'static str,
        key: &str,
        value: Option<Param>,
    ) -> Result<(), StoreError> {
        match value {
            Some(v) => self.write(table, put, vec![text(key), v])?,
            None => self.write(table, delete, vec![text(key)])?,
        };
        Ok(())
    }
}

/// A statement's parameter, owned so it can travel to the database thread.
enum Param {
    Text(String),
    OptText(Option<String>),
    OptInt(Option<i64>),
    Int(i64),
    Json(serde_json::Value),
}

impl Param {
    fn as_sql(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Param::Text(s) => s,
            Param::OptText(s) => s,
            Param::OptInt(i) => i,
            Param::Int(i) => i,
            Param::Json(v) => v,
        }
    }
}

fn text(s: &str) -> Param {
    Param::Text(s.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Param {
    Param::Json(serde_json::to_value(v).expect("store values serialize"))
}

/// Records node proofs as they come, all those waiting in one statement: a
/// reconnect storm of 10,000 agents is a few dozen round trips, not 10,000.
/// Expired proofs are refused by their time stamp anyway; they are removed
/// now and then, not on every batch.
async fn record_proofs(slot: Slot, mut queued: tokio::sync::mpsc::UnboundedReceiver<ProofUse>) {
    let mut swept = 0u64;
    while let Some(first) = queued.recv().await {
        let mut batch = vec![first];
        while batch.len() < PROOF_BATCH {
            match queued.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let client = slot.lock().unwrap().clone();
        let answers = match client {
            Some(c) => {
                let now = crate::protocol::now_millis();
                let sweep = now.saturating_sub(swept) >= PROOF_SWEEP_MS;
                let result = insert_proofs(&c, &batch, sweep.then_some(now as i64)).await;
                if sweep && result.is_ok() {
                    swept = now;
                }
                result
            }
            None => Err(StoreError::Db(
                "the database connection is being made again".into(),
            )),
        };
        match answers {
            Ok(new) => {
                for (proof, new) in batch.into_iter().zip(new) {
                    let _ = proof.reply.send(Ok(new));
                }
            }
            Err(e) => {
                let why = match e {
                    StoreError::Db(why) => why,
                    other => other.to_string(),
                };
                for proof in batch {
                    let _ = proof.reply.send(Err(StoreError::Db(why.clone())));
                }
            }
        }
    }
}

/// Inserts a batch of proofs; for each, whether it was new. A digest twice
/// in one batch is new the first time only.
async fn insert_proofs(
    c: &Client,
    batch: &[ProofUse],
    sweep_before: Option<i64>,
) -> Result<Vec<bool>, StoreError> {
    if let Some(now) = sweep_before {
        c.execute("DELETE FROM used_proofs WHERE until_ms < $1", &[&now])
            .await
            .map_err(db)?;
    }
    let mut digests: Vec<&str> = Vec::with_capacity(batch.len());
    let mut untils: Vec<i64> = Vec::with_capacity(batch.len());
    for p in batch {
        if !digests.contains(&p.digest.as_str()) {
            digests.push(&p.digest);
            untils.push(p.until_ms);
        }
    }
    let rows = c
        .query(
            "INSERT INTO used_proofs (digest, until_ms)
             SELECT * FROM unnest($1::text[], $2::bigint[])
             ON CONFLICT DO NOTHING RETURNING digest",
            &[&digests, &untils],
        )
        .await
        .map_err(db)?;
    let mut new: std::collections::HashSet<String> =
        rows.iter().map(|r| r.get::<_, String>(0)).collect();
    // Each digest is new at most once, to its first asker.
    Ok(batch.iter().map(|p| new.remove(&p.digest)).collect())
}

fn wait<T: Send + 'static>(rt: &tokio::runtime::Handle, job: Job<T>) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(job.await);
    });
    rx.recv()
        .map_err(|_| StoreError::Db("the database thread has stopped".into()))?
}

impl Store for PgStore {
    fn node_identity(&self, node_id: &str) -> Option<NodeIdentity> {
        self.cache.lock().unwrap().node_identity(node_id)
    }

    fn bind_node(
        &self,
        node_id: &str,
        public_key: &str,
        org: &str,
    ) -> Result<NodeIdentity, StoreError> {
        let fresh = NodeIdentity::fresh(public_key, org);
        // First come, first bound, across every replica: the insert does
        // nothing if the id is bound, and the binding that holds is read.
        self.write(
            "nodes",
            "INSERT INTO nodes (node_id, public_key, binding, bound_at, org)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (node_id) DO NOTHING",
            vec![
                text(node_id),
                text(&fresh.public_key),
                text(&fresh.binding),
                text(&fresh.bound_at),
                text(org),
            ],
        )?;
        let id = node_id.to_string();
        let bound = self.run(move |c| {
            Box::pin(async move {
                let r = c
                    .query_one(
                        "SELECT public_key, binding, bound_at, org FROM nodes WHERE node_id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(db)?;
                Ok(NodeIdentity {
                    public_key: r.get(0),
                    binding: r.get(1),
                    bound_at: r.get(2),
                    org: r.get(3),
                })
            })
        })?;
        bound.admit(node_id, &fresh)
    }

    fn refresh_node(&self, node_id: &str) -> Option<NodeIdentity> {
        let (cache, node) = (self.cache.clone(), node_id.to_string());
        let read = self
            .run(move |c| Box::pin(async move { reload(&c, &cache, "nodes", Some(&node)).await }));
        if let Err(e) = read {
            tracing::warn!(error = %e, "could not read a node's identity");
        }
        self.node_identity(node_id)
    }

    fn forget_node(&self, node_id: &str) -> Result<bool, StoreError> {
        self.write(
            "desired_configs",
            "DELETE FROM desired_configs WHERE node_id = $1",
            vec![text(node_id)],
        )?;
        self.write(
            "mcp_nodes",
            "DELETE FROM mcp_nodes WHERE node_id = $1",
            vec![text(node_id)],
        )?;
        // Not the table's key: the whole table is read again.
        self.write(
            "deployments",
            "DELETE FROM deployments WHERE node_id = $1",
            vec![Param::OptText(Some(node_id.to_string()))],
        )?;
        let n = self.write(
            "nodes",
            "DELETE FROM nodes WHERE node_id = $1",
            vec![text(node_id)],
        )?;
        Ok(n > 0)
    }

    fn is_current(&self, node_id: &str, binding: &str) -> bool {
        self.cache.lock().unwrap().is_current(node_id, binding)
    }

    fn add_preview(&self, grant: PreviewGrant) -> Result<(), StoreError> {
        let now = crate::server::preview::now_secs() as i64;
        self.write(
            "previews",
            "DELETE FROM previews WHERE expires <= $1",
            vec![Param::Int(now)],
        )?;
        self.write(
            "previews",
            "INSERT INTO previews (id, expires, grant_) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET expires = $2, grant_ = $3",
            vec![
                text(&grant.id),
                Param::Int(grant.expires as i64),
                json(&grant),
            ],
        )?;
        Ok(())
    }

    fn preview(&self, id: &str) -> Option<PreviewGrant> {
        self.cache.lock().unwrap().preview(id)
    }

    fn revoke_preview(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.write(
            "previews",
            "DELETE FROM previews WHERE id = $1",
            vec![text(id)],
        )?;
        Ok(n > 0)
    }

    fn previews(&self) -> Vec<PreviewGrant> {
        self.cache.lock().unwrap().previews()
    }

    fn mcp_nodes(&self) -> Vec<String> {
        self.cache.lock().unwrap().mcp_nodes()
    }

    fn set_mcp_node(&self, node_id: &str, allowed: bool) -> Result<bool, StoreError> {
        let n = if allowed {
            self.write(
                "mcp_nodes",
                "INSERT INTO mcp_nodes (node_id) VALUES ($1) ON CONFLICT DO NOTHING",
                vec![text(node_id)],
            )?
        } else {
            self.write(
                "mcp_nodes",
                "DELETE FROM mcp_nodes WHERE node_id = $1",
                vec![text(node_id)],
            )?
        };
        Ok(n > 0)
    }

    fn add_mcp_token(&self, token: McpToken) -> Result<(), StoreError> {
        self.write(
            "mcp_tokens",
            "INSERT INTO mcp_tokens (id, hash, token) VALUES ($1, $2, $3)",
            vec![text(&token.id), text(&token.hash), json(&token)],
        )?;
        Ok(())
    }

    fn mcp_token_by_hash(&self, hash: &str) -> Option<McpToken> {
        self.cache.lock().unwrap().mcp_token_by_hash(hash)
    }

    fn revoke_mcp_token(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.write(
            "mcp_tokens",
            "DELETE FROM mcp_tokens WHERE id = $1",
            vec![text(id)],
        )?;
        Ok(n > 0)
    }

    fn mcp_tokens(&self) -> Vec<McpToken> {
        self.cache.lock().unwrap().mcp_tokens()
    }

    fn set_desired_config(
        &self,
        node_id: &str,
        cfg: Option<&crate::protocol::NodeConfig>,
    ) -> Result<(), StoreError> {
        self.put_or_delete(
            "desired_configs",
            "INSERT INTO desired_configs (node_id, config) VALUES ($1, $2)
             ON CONFLICT (node_id) DO UPDATE SET config = $2",
            "DELETE FROM desired_configs WHERE node_id = $1",
            node_id,
            cfg.map(json),
        )
    }

    fn desired_configs(&self) -> Vec<(String, crate::protocol::NodeConfig)> {
        self.cache.lock().unwrap().desired_configs()
    }

    fn desired_config(&self, node_id: &str) -> Option<crate::protocol::NodeConfig> {
        self.cache.lock().unwrap().desired_config(node_id)
    }

    fn use_proof(
        &self,
        digest: &str,
        until_ms: u64,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = self.proofs.send(ProofUse {
            digest: digest.to_string(),
            until_ms: until_ms as i64,
            reply,
        });
        Box::pin(async move {
            queued.map_err(|_| StoreError::Db("the database thread has stopped".into()))?;
            answer
                .await
                .map_err(|_| StoreError::Db("the database thread has stopped".into()))?
        })
    }

    fn deployment_node(&self, name: &str) -> Option<String> {
        self.cache.lock().unwrap().deployment_node(name)
    }

    fn set_deployment_node(&self, name: &str, node_id: Option<&str>) -> Result<(), StoreError> {
        self.put_or_delete(
            "deployments",
            "INSERT INTO deployments (name, node_id) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET node_id = $2",
            "DELETE FROM deployments WHERE name = $1",
            name,
            node_id.map(text),
        )
    }

    fn claim_deployment(&self, name: &str, node_id: &str) -> Result<Claim, StoreError> {
        // Forgetting a node deletes its deployments' rows, so a row names
        // a node the store knows. A row deleted between the insert and
        // the read (a `down` elsewhere) frees the name: try once more.
        for _ in 0..2 {
            let made = self.write(
                "deployments",
                "INSERT INTO deployments (name, node_id) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING",
                vec![text(name), text(node_id)],
            )?;
            if made == 1 {
                return Ok(Claim::New);
            }
            match self.deployment_node(name) {
                Some(at) if at == node_id => return Ok(Claim::Held),
                Some(at) => return Ok(Claim::TakenBy(at)),
                None => continue,
            }
        }
        Err(StoreError::Db(format!(
            "deployment {name}: its record changed while it was claimed; try again"
        )))
    }

    fn release_deployment(&self, name: &str, node_id: &str) -> Result<(), StoreError> {
        self.write(
            "deployments",
            "DELETE FROM deployments WHERE name = $1 AND node_id = $2",
            vec![text(name), text(node_id)],
        )
        .map(drop)
    }

    fn organizations(&self) -> Vec<Organization> {
        self.cache.lock().unwrap().organizations()
    }

    fn add_organization(&self, org: Organization, key: RegistrationKey) -> Result<(), StoreError> {
        if is_default(&org.name) {
            return Err(StoreError::OrgExists(org.name));
        }
        let n = self.write(
            "orgs",
            "INSERT INTO orgs (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            vec![text(&org.name), text(&org.created_at)],
        )?;
        if n == 0 {
            return Err(StoreError::OrgExists(org.name));
        }
        self.add_registration_key(key)
    }

    fn add_registration_key(&self, key: RegistrationKey) -> Result<(), StoreError> {
        self.check_org(&key.org)?;
        self.write(
            "registration_keys",
            "INSERT INTO registration_keys (id, org, hash, created_at) VALUES ($1, $2, $3, $4)",
            vec![
                text(&key.id),
                text(&key.org),
                text(&key.hash),
                text(&key.created_at),
            ],
        )?;
        Ok(())
    }

    fn registration_key_by_hash(&self, hash: &str) -> Option<RegistrationKey> {
        self.cache.lock().unwrap().registration_key_by_hash(hash)
    }

    fn add_operator_token(&self, token: OperatorToken) -> Result<(), StoreError> {
        self.check_org(&token.org)?;
        self.write(
            "operator_tokens",
            "INSERT INTO operator_tokens (id, org, hash, created_at, expires)
             VALUES ($1, $2, $3, $4, $5)",
            vec![
                text(&token.id),
                text(&token.org),
                text(&token.hash),
                text(&token.created_at),
                Param::OptInt(token.expires.map(|e| e.min(i64::MAX as u64) as i64)),
            ],
        )?;
        Ok(())
    }

    fn operator_token_by_hash(&self, hash: &str) -> Option<OperatorToken> {
        self.cache.lock().unwrap().operator_token_by_hash(hash)
    }

    fn refresh_operator_token(&self, hash: &str) -> Option<OperatorToken> {
        let (cache, h) = (self.cache.clone(), hash.to_string());
        let read = self.run(move |c| {
            Box::pin(async move {
                let rows = c
                    .query("SELECT id FROM operator_tokens WHERE hash = $1", &[&h])
                    .await
                    .map_err(db)?;
                for r in rows {
                    let id: String = r.get(0);
                    reload(&c, &cache, "operator_tokens", Some(&id)).await?;
                }
                Ok(())
            })
        });
        if let Err(e) = read {
            tracing::warn!(error = %e, "could not read an operator token");
        }
        self.operator_token_by_hash(hash)
    }

    fn operator_tokens(&self) -> Vec<OperatorToken> {
        self.cache.lock().unwrap().operator_tokens()
    }

    fn revoke_operator_token(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.write(
            "operator_tokens",
            "DELETE FROM operator_tokens WHERE id = $1",
            vec![text(id)],
        )?;
        Ok(n > 0)
    }

    fn secret(&self, name: &str, fresh: String) -> Result<String, StoreError> {
        let name = name.to_string();
        // The first replica to start makes it; the others read that one.
        self.run(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&name, &fresh],
                )
                .await
                .map_err(db)?;
                let r = c
                    .query_one("SELECT value FROM secrets WHERE name = $1", &[&name])
                    .await
                    .map_err(db)?;
                Ok(r.get(0))
            })
        })
    }

    fn hold_nodes(
        &self,
        id: &str,
        url: &str,
        nodes: &[String],
        lease: std::time::Duration,
    ) -> Result<(), StoreError> {
        let (id, url, nodes) = (id.to_string(), url.to_string(), nodes.to_vec());
        let secs = lease.as_secs_f64();
        self.run(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO replicas (id, url, held_until)
                     VALUES ($1, $2, now() + make_interval(secs => $3))
                     ON CONFLICT (id) DO UPDATE SET url = $2, held_until = EXCLUDED.held_until",
                    &[&id, &url, &secs],
                )
                .await
                .map_err(db)?;
                // A node another replica holds on a live lease stays its:
                // the newer connection takes it when that lease runs out
                // or that replica lets go.
                c.execute(
                    "INSERT INTO node_holders (node_id, replica_id, held_until)
                     SELECT n, $1, now() + make_interval(secs => $3) FROM unnest($2::text[]) AS n
                     ON CONFLICT (node_id) DO UPDATE
                       SET replica_id = $1, held_until = EXCLUDED.held_until
                       WHERE node_holders.replica_id = $1 OR node_holders.held_until < now()",
                    &[&id, &nodes, &secs],
                )
                .await
                .map_err(db)?;
                c.execute(
                    "DELETE FROM node_holders WHERE replica_id = $1 AND NOT (node_id = ANY($2))",
                    &[&id, &nodes],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
    }

    fn node_holder(&self, node_id: &str) -> Option<(String, String)> {
        let node = node_id.to_string();
        self.run(move |c| {
            Box::pin(async move {
                let r = c
                    .query_opt(
                        "SELECT r.id, r.url FROM node_holders h JOIN replicas r ON r.id = h.replica_id
                         WHERE h.node_id = $1 AND h.held_until > now()",
                        &[&node],
                    )
                    .await
                    .map_err(db)?;
                Ok(r.map(|r| (r.get(0), r.get(1))))
            })
        })
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read who holds a node");
            None
        })
    }

    fn peers(&self, id: &str) -> Vec<(String, String)> {
        let id = id.to_string();
        self.run(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT id, url FROM replicas WHERE id <> $1 AND held_until > now() ORDER BY id",
                        &[&id],
                    )
                    .await
                    .map_err(db)?;
                Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
            })
        })
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the other replicas");
            Vec::new()
        })
    }

    fn remove_organization(&self, name: &str) -> Result<bool, StoreError> {
        if is_default(name) {
            return Err(StoreError::DefaultOrg);
        }
        let org = name.to_string();
        let cache = self.cache.clone();
        // One transaction. A registration racing the removal can still bind
        // a node to the organization being removed (its key was checked
        // before); such a node is forgotten like any other.
        self.run(move |c| {
            Box::pin(async move {
                c.batch_execute("BEGIN").await.map_err(db)?;
                let work = async {
                    let nodes: i64 = c
                        .query_one("SELECT count(*) FROM nodes WHERE org = $1", &[&org])
                        .await?
                        .get(0);
                    if nodes > 0 {
                        return Ok(Err(StoreError::OrgHasNodes {
                            org: org.clone(),
                            nodes: nodes as usize,
                        }));
                    }
                    c.execute("DELETE FROM registration_keys WHERE org = $1", &[&org])
                        .await?;
                    c.execute("DELETE FROM operator_tokens WHERE org = $1", &[&org])
                        .await?;
                    c.execute("DELETE FROM mcp_tokens WHERE token->>'org' = $1", &[&org])
                        .await?;
                    c.execute("DELETE FROM previews WHERE grant_->>'org' = $1", &[&org])
                        .await?;
                    let n = c
                        .execute("DELETE FROM orgs WHERE name = $1", &[&org])
                        .await?;
                    Ok::<_, tokio_postgres::Error>(Ok(n > 0))
                };
                let r = match work.await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = c.batch_execute("ROLLBACK").await;
                        return Err(db(e));
                    }
                };
                if r.is_err() {
                    let _ = c.batch_execute("ROLLBACK").await;
                    return r;
                }
                c.batch_execute("COMMIT").await.map_err(db)?;
                for t in [
                    "orgs",
                    "registration_keys",
                    "operator_tokens",
                    "mcp_tokens",
                    "previews",
                ] {
                    notify(&c, t, None).await?;
                    reload(&c, &cache, t, None).await?;
                }
                r
            })
        })
    }

    fn append_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let params = [
            Param::OptText(record.task_id.clone()),
            Param::OptText(record.worker_id.clone()),
            Param::OptText(record.org.clone()),
            json(record),
        ];
        let keep = self.audit_keep;
        // Not cached: nothing to tell the other replicas.
        self.run(move |c| {
            Box::pin(async move {
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    params.iter().map(Param::as_sql).collect();
                let row = c
                    .query_one(
                        "INSERT INTO audit (task_id, worker_id, org, record)
                         VALUES ($1, $2, $3, $4) RETURNING seq",
                        &refs,
                    )
                    .await
                    .map_err(db)?;
                // The oldest go: a range of the primary key, empty (and
                // cheap) unless something is due.
                let seq: i64 = row.get(0);
                c.execute("DELETE FROM audit WHERE seq <= $1", &[&(seq - keep)])
                    .await
                    .map_err(db)?;
                Ok(())
            })
        })
    }

    fn audit(&self, filter: &AuditFilter) -> Vec<AuditRecord> {
        let f = filter.clone();
        let r = self.run(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT record FROM audit
                         WHERE ($1::text IS NULL OR task_id = $1)
                           AND ($2::text IS NULL OR worker_id = $2)
                           AND ($3::text IS NULL OR org = $3)
                         ORDER BY seq",
                        &[&f.task, &f.worker, &f.org],
                    )
                    .await
                    .map_err(db)?;
                rows.into_iter()
                    .map(|r| from_json(r.get(0)))
                    .collect::<Result<Vec<AuditRecord>, _>>()
            })
        });
        r.unwrap_or_else(|e| {
            tracing::error!(error = %e, "could not read the audit trail");
            Vec::new()
        })
    }
}

impl PgStore {
    fn check_org(&self, org: &str) -> Result<(), StoreError> {
        self.cache.lock().unwrap().check_org(org)
    }
}
