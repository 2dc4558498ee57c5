//! The schema of the PostgreSQL store: its versioned steps and how they
//! are applied, one replica at a time.

use super::db;
use crate::server::store::StoreError;
use tokio_postgres::Client;

/// The schema, one step per version; a step runs once, in a transaction.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE nodes (node_id text PRIMARY KEY, public_key text NOT NULL,
        binding text NOT NULL, bound_at text NOT NULL, org text NOT NULL);
     CREATE TABLE orgs (name text PRIMARY KEY, created_at text NOT NULL);
     CREATE TABLE registration_keys (id text PRIMARY KEY, org text NOT NULL,
        hash text NOT NULL UNIQUE, created_at text NOT NULL);
     CREATE TABLE operator_tokens (id text PRIMARY KEY, org text NOT NULL,
        hash text NOT NULL UNIQUE, created_at text NOT NULL, expires bigint);
     CREATE TABLE previews (id text PRIMARY KEY, expires bigint NOT NULL, grant_ jsonb NOT NULL);
     CREATE TABLE mcp_nodes (node_id text PRIMARY KEY);
     CREATE TABLE mcp_tokens (id text PRIMARY KEY, hash text NOT NULL UNIQUE, token jsonb NOT NULL);
     CREATE TABLE desired_configs (node_id text PRIMARY KEY, config jsonb NOT NULL);
     CREATE TABLE audit (seq bigserial PRIMARY KEY, task_id text, worker_id text, org text,
        record jsonb NOT NULL);
     CREATE INDEX audit_task ON audit (task_id);
     CREATE INDEX audit_worker ON audit (worker_id);
     CREATE TABLE secrets (name text PRIMARY KEY, value text NOT NULL);",
    ),
    (
        2,
        "CREATE TABLE replicas (id text PRIMARY KEY, url text NOT NULL,
            held_until timestamptz NOT NULL);
         CREATE TABLE node_holders (node_id text PRIMARY KEY, replica_id text NOT NULL,
            held_until timestamptz NOT NULL);
         CREATE INDEX node_holders_replica ON node_holders (replica_id);",
    ),
    (
        3,
        "CREATE TABLE deployments (name text PRIMARY KEY, node_id text NOT NULL);
         CREATE INDEX deployments_node ON deployments (node_id);
         -- Rows live minutes: no WAL for them (a crash empties the table;
         -- each replica's own memory of proofs still holds).
         CREATE UNLOGGED TABLE used_proofs (digest text PRIMARY KEY, until_ms bigint NOT NULL);
         CREATE INDEX used_proofs_until ON used_proofs (until_ms);",
    ),
];

/// Serialises migrations of replicas that start at once.
const MIGRATION_LOCK: i64 = 0x7465_7468; // "teth"

pub(super) async fn migrate(c: &Client) -> Result<(), StoreError> {
    // One replica at a time, from before the bookkeeping table exists:
    // two concurrent `CREATE TABLE IF NOT EXISTS` can still collide.
    c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    let r = migrate_locked(c).await;
    let _ = c
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    r
}

async fn migrate_locked(c: &Client) -> Result<(), StoreError> {
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS tether_migrations (version int PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(db)?;
    for (version, sql) in MIGRATIONS {
        let done = c
            .query_opt(
                "SELECT 1 FROM tether_migrations WHERE version = $1",
                &[version],
            )
            .await
            .map_err(db)?
            .is_some();
        if done {
            continue;
        }
        c.batch_execute("BEGIN").await.map_err(db)?;
        let step = async {
            c.batch_execute(sql).await?;
            c.execute(
                "INSERT INTO tether_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            Ok::<_, tokio_postgres::Error>(())
        };
        match step.await {
            Ok(()) => {
                c.batch_execute("COMMIT").await.map_err(db)?;
                tracing::info!(version, "database schema migrated");
            }
            Err(e) => {
                let _ = c.batch_execute("ROLLBACK").await;
                return Err(db(e));
            }
        }
    }
    Ok(())
}
