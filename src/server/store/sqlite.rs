//! The single-machine store: an SQLite database, `state.db` under the
//! server's state directory. Each item is one row, so a change writes what
//! changed and nothing else (registering the 10,000th node costs what the
//! first did); a copy in memory answers the reads.

use super::state::State;
use super::{Claim, McpToken, NodeIdentity, Store, StoreError};
use crate::protocol::NodeConfig;
use crate::server::orgs::{OperatorToken, Organization, RegistrationKey};
use crate::server::preview::PreviewGrant;
use rusqlite::Connection;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The database file under the state directory.
pub const DB_FILE: &str = "state.db";
/// Where the store was kept before it was a database: imported once, then
/// renamed to `state.json.imported`.
const JSON_FILE: &str = "state.json";

/// One table per kind of item: its key, and the item as JSON (readable
/// with `sqlite3 state.db "SELECT value FROM nodes"`).
const TABLES: [&str; 9] = [
    "nodes",
    "previews",
    "mcp_nodes",
    "mcp_tokens",
    "desired_configs",
    "orgs",
    "registration_keys",
    "operator_tokens",
    "deployments",
];

/// The schema's version, in `PRAGMA user_version` (2: `deployments`).
const SCHEMA_VERSION: i32 = 2;

pub struct SqliteStore {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// `audit.jsonl` beside the database.
    audit: crate::server::audit::AuditLog,
}

struct Inner {
    conn: Connection,
    state: State,
}

/// One item written or removed: what a change does, to the database and
/// then to the copy in memory.
enum Op {
    Node(String, Option<NodeIdentity>),
    Preview(String, Option<PreviewGrant>),
    McpNode(String, bool),
    McpToken(String, Option<McpToken>),
    Desired(String, Option<NodeConfig>),
    Org(String, Option<Organization>),
    RegistrationKey(String, Option<RegistrationKey>),
    OperatorToken(String, Option<OperatorToken>),
    Deployment(String, Option<String>),
}

impl Op {
    /// Its table, key, and the row's value (none: delete the row).
    fn row(&self) -> (&'static str, &str, Option<String>) {
        fn json<T: Serialize>(v: &Option<T>) -> Option<String> {
            v.as_ref()
                .map(|v| serde_json::to_string(v).expect("state serialises"))
        }
        match self {
            Op::Node(k, v) => ("nodes", k, json(v)),
            Op::Preview(k, v) => ("previews", k, json(v)),
            Op::McpNode(k, on) => ("mcp_nodes", k, on.then(|| "true".into())),
            Op::McpToken(k, v) => ("mcp_tokens", k, json(v)),
            Op::Desired(k, v) => ("desired_configs", k, json(v)),
            Op::Org(k, v) => ("orgs", k, json(v)),
            Op::RegistrationKey(k, v) => ("registration_keys", k, json(v)),
            Op::OperatorToken(k, v) => ("operator_tokens", k, json(v)),
            Op::Deployment(k, v) => ("deployments", k, json(v)),
        }
    }

    fn apply(self, s: &mut State) {
        fn set<T>(map: &mut BTreeMap<String, T>, k: String, v: Option<T>) {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        match self {
            Op::Node(k, v) => set(&mut s.nodes, k, v),
            Op::Preview(k, v) => set(&mut s.previews, k, v),
            Op::McpNode(k, true) => {
                s.mcp_nodes.insert(k);
            }
            Op::McpNode(k, false) => {
                s.mcp_nodes.remove(&k);
            }
            Op::McpToken(k, v) => set(&mut s.mcp_tokens, k, v),
            Op::Desired(k, v) => set(&mut s.desired_configs, k, v),
            Op::Org(k, v) => set(&mut s.orgs, k, v),
            Op::RegistrationKey(k, v) => set(&mut s.registration_keys, k, v),
            Op::OperatorToken(k, v) => set(&mut s.operator_tokens, k, v),
            Op::Deployment(k, v) => set(&mut s.deployments, k, v),
        }
    }
}

/// Every item of `state` as an op that writes it (the import of a
/// `state.json`).
fn ops_of(s: State) -> Vec<Op> {
    fn all<T>(m: BTreeMap<String, T>, op: fn(String, Option<T>) -> Op) -> Vec<Op> {
        m.into_iter().map(|(k, v)| op(k, Some(v))).collect()
    }
    let mut ops = all(s.nodes, Op::Node);
    ops.extend(all(s.previews, Op::Preview));
    ops.extend(s.mcp_nodes.into_iter().map(|k| Op::McpNode(k, true)));
    ops.extend(all(s.mcp_tokens, Op::McpToken));
    ops.extend(all(s.desired_configs, Op::Desired));
    ops.extend(all(s.orgs, Op::Org));
    ops.extend(all(s.registration_keys, Op::RegistrationKey));
    ops.extend(all(s.operator_tokens, Op::OperatorToken));
    ops.extend(all(s.deployments, Op::Deployment));
    ops
}

impl SqliteStore {
    /// Opens (or makes, 0600) `state.db` under `dir`, importing a
    /// `state.json` found there.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        let path = dir.join(DB_FILE);
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        // SQLite makes its -wal and -shm files with the database's mode.
        create_private(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let conn = Connection::open(&path).map_err(sql)?;
        // WAL: a commit is one append and one sync; FULL: that sync is
        // made before the commit returns, so an answered change survives a
        // power cut. The busy timeout covers a backup reading at the time.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
        )
        .map_err(sql)?;
        migrate(&conn).map_err(sql)?;
        let mut inner = Inner {
            state: load(&conn).map_err(sql)?,
            conn,
        };
        let json = dir.join(JSON_FILE);
        if let Some(old) = read_json(&json)? {
            let ops = ops_of(old);
            let n = ops.len();
            inner.commit(ops).map_err(sql)?;
            let kept = dir.join("state.json.imported");
            std::fs::rename(&json, &kept).map_err(|source| StoreError::Io {
                path: json.clone(),
                source,
            })?;
            tracing::info!(
                from = %json.display(),
                to = %path.display(),
                items = n,
                "imported the server state into the database (the old file is kept as {})",
                kept.display()
            );
        }
        let audit = crate::server::audit::AuditLog::new(
            dir.join("audit.jsonl"),
            crate::server::audit::DEFAULT_MAX_BYTES,
        );
        Ok(SqliteStore {
            path,
            inner: Mutex::new(inner),
            audit,
        })
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.inner.lock().unwrap().state)
    }

    /// Plans a change from the present state, writes it in one
    /// transaction, and applies it in memory only once written: a failed
    /// write changes nothing.
    fn update<T>(
        &self,
        plan: impl FnOnce(&State) -> Result<(T, Vec<Op>), StoreError>,
    ) -> Result<T, StoreError> {
        let mut inner = self.inner.lock().unwrap();
        let (out, ops) = plan(&inner.state)?;
        inner.commit(ops).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })?;
        Ok(out)
    }
}

impl Inner {
    fn commit(&mut self, ops: Vec<Op>) -> rusqlite::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for op in &ops {
            let (table, key, value) = op.row();
            match value {
                Some(v) => tx
                    .prepare_cached(&format!(
                        "INSERT INTO {table} (key, value) VALUES (?1, ?2)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value"
                    ))?
                    .execute((key, v))?,
                None => tx
                    .prepare_cached(&format!("DELETE FROM {table} WHERE key = ?1"))?
                    .execute((key,))?,
            };
        }
        tx.commit()?;
        for op in ops {
            op.apply(&mut self.state);
        }
        Ok(())
    }
}

/// A change made only `if_`: whether it was, and its op.
fn only_if(if_: bool, op: impl FnOnce() -> Op) -> Result<(bool, Vec<Op>), StoreError> {
    Ok((if_, if_.then(op).into_iter().collect()))
}

fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let mut sql = String::from("BEGIN;");
    for t in TABLES {
        sql.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        ));
    }
    sql.push_str(&format!("PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"));
    conn.execute_batch(&sql)
}

fn load(conn: &Connection) -> rusqlite::Result<State> {
    fn table<T: DeserializeOwned>(
        conn: &Connection,
        name: &str,
    ) -> rusqlite::Result<BTreeMap<String, T>> {
        let mut stmt = conn.prepare(&format!("SELECT key, value FROM {name}"))?;
        let rows = stmt.query_map([], |r| {
            let key: String = r.get(0)?;
            let value: String = r.get(1)?;
            let item = serde_json::from_str(&value).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into())
            })?;
            Ok((key, item))
        })?;
        rows.collect()
    }
    let mcp_nodes: BTreeMap<String, bool> = table(conn, "mcp_nodes")?;
    Ok(State {
        version: SCHEMA_VERSION as u32,
        nodes: table(conn, "nodes")?,
        previews: table(conn, "previews")?,
        mcp_nodes: mcp_nodes.into_keys().collect(),
        mcp_tokens: table(conn, "mcp_tokens")?,
        desired_configs: table(conn, "desired_configs")?,
        orgs: table(conn, "orgs")?,
        registration_keys: table(conn, "registration_keys")?,
        operator_tokens: table(conn, "operator_tokens")?,
        deployments: table(conn, "deployments")?,
    })
}

fn read_json(path: &Path) -> Result<Option<State>, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(e)),
    }
}

impl Store for SqliteStore {
    fn node_identity(&self, node_id: &str) -> Option<NodeIdentity> {
        self.read(|s| s.node_identity(node_id))
    }

    fn bind_node(
        &self,
        node_id: &str,
        public_key: &str,
        org: &str,
    ) -> Result<NodeIdentity, StoreError> {
        let fresh = NodeIdentity::fresh(public_key, org);
        self.update(|s| {
            if let Some(existing) = s.nodes.get(node_id) {
                return Ok((existing.clone().admit(node_id, &fresh)?, vec![]));
            }
            let op = Op::Node(node_id.to_string(), Some(fresh.clone()));
            Ok((fresh, vec![op]))
        })
    }

    fn is_current(&self, node_id: &str, binding: &str) -> bool {
        self.read(|s| s.is_current(node_id, binding))
    }

    fn forget_node(&self, node_id: &str) -> Result<bool, StoreError> {
        self.update(|s| {
            if !s.nodes.contains_key(node_id) {
                return Ok((false, vec![]));
            }
            let mut ops = vec![Op::Node(node_id.into(), None)];
            if s.desired_configs.contains_key(node_id) {
                ops.push(Op::Desired(node_id.into(), None));
            }
            // The id may come back bound anew, perhaps in another
            // organization: it starts off the MCP allowlist.
            if s.mcp_nodes.contains(node_id) {
                ops.push(Op::McpNode(node_id.into(), false));
            }
            ops.extend(
                s.deployments_of(node_id)
                    .into_iter()
                    .map(|d| Op::Deployment(d, None)),
            );
            Ok((true, ops))
        })
    }

    fn set_desired_config(
        &self,
        node_id: &str,
        cfg: Option<&NodeConfig>,
    ) -> Result<(), StoreError> {
        self.update(|_| Ok(((), vec![Op::Desired(node_id.into(), cfg.cloned())])))
    }

    fn desired_configs(&self) -> Vec<(String, NodeConfig)> {
        self.read(State::desired_configs)
    }

    fn deployment_node(&self, name: &str) -> Option<String> {
        self.read(|s| s.deployment_node(name))
    }

    fn set_deployment_node(&self, name: &str, node_id: Option<&str>) -> Result<(), StoreError> {
        self.update(|s| {
            let changed = s.deployments.get(name).map(String::as_str) != node_id;
            only_if(changed, || {
                Op::Deployment(name.into(), node_id.map(String::from))
            })
            .map(|(_, ops)| ((), ops))
        })
    }

    fn claim_deployment(&self, name: &str, node_id: &str) -> Result<Claim, StoreError> {
        self.update(|s| match s.deployment_node(name) {
            Some(at) if at == node_id => Ok((Claim::Held, vec![])),
            Some(at) if s.nodes.contains_key(&at) => Ok((Claim::TakenBy(at), vec![])),
            _ => Ok((
                Claim::New,
                vec![Op::Deployment(name.into(), Some(node_id.into()))],
            )),
        })
    }

    fn release_deployment(&self, name: &str, node_id: &str) -> Result<(), StoreError> {
        self.update(|s| {
            let ours = s.deployment_node(name).as_deref() == Some(node_id);
            only_if(ours, || Op::Deployment(name.into(), None)).map(|(_, ops)| ((), ops))
        })
    }

    fn desired_config(&self, node_id: &str) -> Option<NodeConfig> {
        self.read(|s| s.desired_config(node_id))
    }

    fn add_preview(&self, grant: PreviewGrant) -> Result<(), StoreError> {
        self.update(|s| {
            let now = crate::server::preview::now_secs();
            let mut ops: Vec<Op> = s
                .previews
                .values()
                .filter(|g| g.expires <= now)
                .map(|g| Op::Preview(g.id.clone(), None))
                .collect();
            ops.push(Op::Preview(grant.id.clone(), Some(grant)));
            Ok(((), ops))
        })
    }

    fn preview(&self, id: &str) -> Option<PreviewGrant> {
        self.read(|s| s.preview(id))
    }

    fn revoke_preview(&self, id: &str) -> Result<bool, StoreError> {
        self.update(|s| only_if(s.previews.contains_key(id), || Op::Preview(id.into(), None)))
    }

    fn previews(&self) -> Vec<PreviewGrant> {
        self.read(State::previews)
    }

    fn mcp_nodes(&self) -> Vec<String> {
        self.read(State::mcp_nodes)
    }

    fn set_mcp_node(&self, node_id: &str, allowed: bool) -> Result<bool, StoreError> {
        self.update(|s| {
            let changed = s.mcp_nodes.contains(node_id) != allowed;
            only_if(changed, || Op::McpNode(node_id.into(), allowed))
        })
    }

    fn add_mcp_token(&self, token: McpToken) -> Result<(), StoreError> {
        self.update(|_| Ok(((), vec![Op::McpToken(token.id.clone(), Some(token))])))
    }

    fn mcp_token_by_hash(&self, hash: &str) -> Option<McpToken> {
        self.read(|s| s.mcp_token_by_hash(hash))
    }

    fn revoke_mcp_token(&self, id: &str) -> Result<bool, StoreError> {
        self.update(|s| {
            only_if(s.mcp_tokens.contains_key(id), || {
                Op::McpToken(id.into(), None)
            })
        })
    }

    fn mcp_tokens(&self) -> Vec<McpToken> {
        self.read(State::mcp_tokens)
    }

    fn organizations(&self) -> Vec<Organization> {
        self.read(State::organizations)
    }

    fn add_organization(&self, org: Organization, key: RegistrationKey) -> Result<(), StoreError> {
        self.update(|s| {
            if crate::server::orgs::is_default(&org.name) || s.orgs.contains_key(&org.name) {
                return Err(StoreError::OrgExists(org.name.clone()));
            }
            Ok((
                (),
                vec![
                    Op::Org(org.name.clone(), Some(org)),
                    Op::RegistrationKey(key.id.clone(), Some(key)),
                ],
            ))
        })
    }

    fn add_registration_key(&self, key: RegistrationKey) -> Result<(), StoreError> {
        self.update(|s| {
            s.check_org(&key.org)?;
            Ok(((), vec![Op::RegistrationKey(key.id.clone(), Some(key))]))
        })
    }

    fn registration_key_by_hash(&self, hash: &str) -> Option<RegistrationKey> {
        self.read(|s| s.registration_key_by_hash(hash))
    }

    fn add_operator_token(&self, token: OperatorToken) -> Result<(), StoreError> {
        self.update(|s| {
            s.check_org(&token.org)?;
            Ok(((), vec![Op::OperatorToken(token.id.clone(), Some(token))]))
        })
    }

    fn operator_token_by_hash(&self, hash: &str) -> Option<OperatorToken> {
        self.read(|s| s.operator_token_by_hash(hash))
    }

    fn operator_tokens(&self) -> Vec<OperatorToken> {
        self.read(State::operator_tokens)
    }

    fn revoke_operator_token(&self, id: &str) -> Result<bool, StoreError> {
        self.update(|s| {
            only_if(s.operator_tokens.contains_key(id), || {
                Op::OperatorToken(id.into(), None)
            })
        })
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
            if !s.orgs.contains_key(name) {
                return Ok((false, vec![]));
            }
            let mut ops = vec![Op::Org(name.into(), None)];
            ops.extend(
                s.registration_keys
                    .values()
                    .filter(|k| k.org == name)
                    .map(|k| Op::RegistrationKey(k.id.clone(), None)),
            );
            ops.extend(
                s.operator_tokens
                    .values()
                    .filter(|t| t.org == name)
                    .map(|t| Op::OperatorToken(t.id.clone(), None)),
            );
            ops.extend(
                s.mcp_tokens
                    .values()
                    .filter(|t| t.org.as_deref() == Some(name))
                    .map(|t| Op::McpToken(t.id.clone(), None)),
            );
            ops.extend(
                s.previews
                    .values()
                    .filter(|g| g.org.as_deref() == Some(name))
                    .map(|g| Op::Preview(g.id.clone(), None)),
            );
            Ok((true, ops))
        })
    }

    /// A file of its own beside `state.db` (0600), as operators know
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_is_first_come_durable_and_forgettable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let s = SqliteStore::open(&path).unwrap();
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
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.node_identity("n1"), Some(a.clone()));
        assert!(s.is_current("n1", &a.binding));
        assert!(!s.is_current("n1", "other"));
        assert!(s.forget_node("n1").unwrap());
        assert!(!s.is_current("n1", &a.binding));
        assert!(!s.forget_node("n1").unwrap());
        let b = s.bind_node("n1", "aa", "default").unwrap();
        assert_ne!(b.binding, a.binding, "a new binding voids old tokens");
        assert_eq!(
            SqliteStore::open(&path).unwrap().node_identity("n1"),
            Some(b)
        );
    }

    #[test]
    fn desired_configurations_are_durable_and_go_with_their_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let cfg: crate::protocol::NodeConfig =
            serde_json::from_value(serde_json::json!({"config_version": "v7"})).unwrap();
        {
            let s = SqliteStore::open(&path).unwrap();
            s.bind_node("n1", "key", "default").unwrap();
            s.set_desired_config("n1", Some(&cfg)).unwrap();
            s.set_desired_config("n2", Some(&cfg)).unwrap();
            s.set_desired_config("n2", None).unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let kept = s.desired_configs();
        assert_eq!(kept.len(), 1);
        assert_eq!(
            (kept[0].0.as_str(), kept[0].1.config_version.as_str()),
            ("n1", "v7")
        );
        assert!(s.forget_node("n1").unwrap());
        assert!(
            SqliteStore::open(&path)
                .unwrap()
                .desired_configs()
                .is_empty()
        );
    }

    #[test]
    fn organizations_keys_and_tokens_are_durable_and_hashed() {
        use crate::server::orgs::{new_id, now_rfc3339, secret_hash};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let s = SqliteStore::open(&path).unwrap();
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
        let s = SqliteStore::open(&path).unwrap();
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
        for secret in ["op-secret", "reg-secret"] {
            assert!(
                !state_bytes(&path)
                    .windows(secret.len())
                    .any(|w| w == secret.as_bytes())
            );
        }
        assert!(s.revoke_operator_token(&token.id).unwrap());
        assert!(!s.revoke_operator_token(&token.id).unwrap());
        assert_eq!(SqliteStore::open(&path).unwrap().operator_tokens(), vec![]);
    }

    #[test]
    fn the_mcp_allowlist_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let s = SqliteStore::open(&path).unwrap();
        assert!(s.mcp_nodes().is_empty(), "none by default");
        assert!(s.set_mcp_node("a", true).unwrap());
        assert!(!s.set_mcp_node("a", true).unwrap());
        assert!(s.set_mcp_node("b", true).unwrap());
        assert!(s.set_mcp_node("b", false).unwrap());
        drop(s);
        assert_eq!(
            SqliteStore::open(&path).unwrap().mcp_nodes(),
            vec!["a".to_string()]
        );
    }

    #[test]
    fn preview_grants_are_durable_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let s = SqliteStore::open(&path).unwrap();
        let key = crate::server::preview::PreviewKey::new(b"k");
        let t = crate::server::preview::Target {
            worker_id: "w",
            container_id: "c",
            port: 80,
        };
        let (g, _) = key.grant(t, None, std::time::Duration::from_secs(60));
        s.add_preview(g.clone()).unwrap();
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.preview(&g.id), Some(g.clone()));
        assert_eq!(s.previews(), vec![g.clone()]);
        assert!(s.revoke_preview(&g.id).unwrap());
        assert!(!s.revoke_preview(&g.id).unwrap());
        assert_eq!(SqliteStore::open(&path).unwrap().preview(&g.id), None);
    }

    /// Every byte the database keeps: the file and its write-ahead log.
    fn state_bytes(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        for f in [DB_FILE, "state.db-wal"] {
            all.extend(std::fs::read(dir.join(f)).unwrap_or_default());
        }
        all
    }

    #[test]
    fn a_state_json_is_imported_once_and_kept_aside() {
        use crate::server::orgs::{new_id, now_rfc3339, secret_hash};
        let dir = tempfile::tempdir().unwrap();
        let mut old = State {
            version: 1,
            ..Default::default()
        };
        let id = NodeIdentity {
            public_key: "aa".into(),
            binding: "b1".into(),
            bound_at: now_rfc3339(),
            org: "acme".into(),
        };
        old.nodes.insert("n1".into(), id.clone());
        old.orgs.insert(
            "acme".into(),
            Organization {
                name: "acme".into(),
                created_at: now_rfc3339(),
            },
        );
        let token = OperatorToken {
            id: new_id(),
            org: "acme".into(),
            hash: secret_hash("op-secret"),
            created_at: now_rfc3339(),
            expires: None,
        };
        old.operator_tokens.insert(token.id.clone(), token.clone());
        old.mcp_nodes.insert("n1".into());
        let cfg: NodeConfig =
            serde_json::from_value(serde_json::json!({"config_version": "v3"})).unwrap();
        old.desired_configs.insert("n1".into(), cfg);
        let json = dir.path().join("state.json");
        std::fs::write(&json, serde_json::to_vec_pretty(&old).unwrap()).unwrap();

        let s = SqliteStore::open(dir.path()).unwrap();
        assert!(!json.exists(), "state.json is moved aside");
        assert!(dir.path().join("state.json.imported").exists());
        let check = |s: &SqliteStore| {
            assert_eq!(s.node_identity("n1"), Some(id.clone()));
            assert!(s.is_current("n1", "b1"));
            assert_eq!(s.organizations().len(), 1);
            assert_eq!(
                s.operator_token_by_hash(&secret_hash("op-secret")),
                Some(token.clone())
            );
            assert_eq!(s.mcp_nodes(), vec!["n1".to_string()]);
            assert_eq!(s.desired_config("n1").unwrap().config_version, "v3");
        };
        check(&s);
        // A change after the import is kept; the import is not made again.
        assert!(s.forget_node("n1").unwrap());
        drop(s);
        let s = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(s.node_identity("n1"), None);
        assert_eq!(s.desired_config("n1"), None);
        assert_eq!(s.organizations().len(), 1);
    }

    #[test]
    fn the_database_is_private_and_holds_one_row_per_item() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path()).unwrap();
        for i in 0..3 {
            s.bind_node(&format!("n{i}"), "aa", "default").unwrap();
        }
        s.bind_node("n0", "aa", "default").unwrap();
        for f in [DB_FILE, "state.db-wal"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM nodes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3);
        let key: String = conn
            .query_row(
                "SELECT json_extract(value, '$.public_key') FROM nodes WHERE key = 'n2'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(key, "aa");
    }
}
