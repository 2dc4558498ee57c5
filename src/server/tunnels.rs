//! Open tunnels as operators see them: one per worker port, with its
//! connections (port-forwarded and preview) counted, bytes both ways, and a
//! way to end them all.

use crate::protocol::operator::TunnelInfo;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio_util::sync::CancellationToken;

type Key = (String, u16);

struct Entry {
    since: SystemTime,
    connections: usize,
    to_worker: Arc<AtomicU64>,
    from_worker: Arc<AtomicU64>,
    closed: CancellationToken,
}

/// The connections a preview grant authorized: ended when it is revoked.
struct Granted {
    connections: usize,
    revoked: CancellationToken,
}

type GrantMap = Arc<Mutex<HashMap<String, Granted>>>;

/// Every open tunnel of this server.
#[derive(Clone, Default)]
pub struct Tunnels {
    open: Arc<Mutex<HashMap<Key, Entry>>>,
    grants: GrantMap,
}

/// One connection through a tunnel; counted while held.
pub struct Connection {
    key: Key,
    open: Arc<Mutex<HashMap<Key, Entry>>>,
    to_worker: Arc<AtomicU64>,
    from_worker: Arc<AtomicU64>,
    closed: CancellationToken,
    /// The preview grant that authorized it, and when that expires.
    grant: Option<(String, GrantMap, CancellationToken, SystemTime)>,
}

impl Tunnels {
    /// A new connection to `port` of `worker_id`.
    pub fn connect(&self, worker_id: &str, port: u16) -> Connection {
        let key = (worker_id.to_string(), port);
        let mut open = self.open.lock().unwrap();
        let e = open.entry(key.clone()).or_insert_with(|| Entry {
            since: SystemTime::now(),
            connections: 0,
            to_worker: Default::default(),
            from_worker: Default::default(),
            closed: CancellationToken::new(),
        });
        e.connections += 1;
        Connection {
            key,
            open: self.open.clone(),
            to_worker: e.to_worker.clone(),
            from_worker: e.from_worker.clone(),
            closed: e.closed.clone(),
            grant: None,
        }
    }

    /// [`Tunnels::connect`] for a request a preview grant authorized: the
    /// connection ends when the grant is revoked here
    /// ([`Tunnels::revoke_grant`]) or expires (Unix seconds `expires`).
    pub fn connect_granted(
        &self,
        worker_id: &str,
        port: u16,
        grant: &str,
        expires: u64,
    ) -> Connection {
        let mut c = self.connect(worker_id, port);
        let revoked = {
            let mut grants = self.grants.lock().unwrap();
            let g = grants.entry(grant.to_string()).or_insert_with(|| Granted {
                connections: 0,
                revoked: CancellationToken::new(),
            });
            g.connections += 1;
            g.revoked.clone()
        };
        let until = std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires);
        c.grant = Some((grant.to_string(), self.grants.clone(), revoked, until));
        c
    }

    /// Ends every connection grant `id` authorized; how many there were.
    pub fn revoke_grant(&self, id: &str) -> usize {
        match self.grants.lock().unwrap().remove(id) {
            Some(g) => {
                g.revoked.cancel();
                g.connections
            }
            None => 0,
        }
    }

    /// Open tunnels, by worker and port.
    pub fn list(&self) -> Vec<TunnelInfo> {
        let open = self.open.lock().unwrap();
        let mut v: Vec<TunnelInfo> = open
            .iter()
            .map(|((w, p), e)| TunnelInfo {
                id: format!("{w}:{p}"),
                worker_id: w.clone(),
                port: *p,
                connections: e.connections,
                bytes_to_worker: e.to_worker.load(Ordering::Relaxed),
                bytes_from_worker: e.from_worker.load(Ordering::Relaxed),
                since: humantime::format_rfc3339_seconds(e.since).to_string(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Ends every connection of the tunnel `WORKER:PORT`; false if none is open.
    pub fn close(&self, id: &str) -> bool {
        let Some((w, p)) = id.rsplit_once(':') else {
            return false;
        };
        let Ok(p) = p.parse::<u16>() else {
            return false;
        };
        let open = self.open.lock().unwrap();
        match open.get(&(w.to_string(), p)) {
            Some(e) => {
                e.closed.cancel();
                true
            }
            None => false,
        }
    }
}

impl Connection {
    pub fn to_worker(&self, n: usize) {
        self.to_worker.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn from_worker(&self, n: usize) {
        self.from_worker.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Completes when an operator closes the tunnel, or when the grant
    /// that authorized the connection is revoked or expires.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + use<> {
        let closed = self.closed.clone();
        let grant = self
            .grant
            .as_ref()
            .map(|(_, _, r, until)| (r.clone(), *until));
        async move {
            let Some((revoked, until)) = grant else {
                return closed.cancelled().await;
            };
            let left = until.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                _ = closed.cancelled() => {}
                _ = revoked.cancelled() => {}
                _ = tokio::time::sleep(left) => {}
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some((id, grants, ..)) = &self.grant {
            let mut grants = grants.lock().unwrap();
            if let Some(g) = grants.get_mut(id) {
                g.connections -= 1;
                if g.connections == 0 {
                    grants.remove(id);
                }
            }
        }
        let mut open = self.open.lock().unwrap();
        if let Some(e) = open.get_mut(&self.key) {
            e.connections -= 1;
            if e.connections == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_counted_and_closed_together() {
        let t = Tunnels::default();
        let a = t.connect("w", 80);
        let b = t.connect("w", 80);
        let c = t.connect("w", 81);
        a.to_worker(10);
        b.from_worker(7);
        let l = t.list();
        assert_eq!(l.len(), 2);
        assert_eq!(
            (
                l[0].id.as_str(),
                l[0].connections,
                l[0].bytes_to_worker,
                l[0].bytes_from_worker
            ),
            ("w:80", 2, 10, 7)
        );
        assert!(!t.close("w:82") && !t.close("nonsense"));
        assert!(t.close("w:80"));
        a.closed().await;
        b.closed().await;
        drop((a, b));
        assert_eq!(t.list().len(), 1, "w:80 is gone with its connections");
        // A new connection after a close is a new tunnel, not closed.
        let d = t.connect("w", 80);
        assert!(!d.closed.is_cancelled());
        drop((c, d));
        assert!(t.list().is_empty());
    }

    #[tokio::test]
    async fn a_grants_connections_end_when_it_is_revoked_or_expires() {
        let t = Tunnels::default();
        let far = crate::server::preview::now_secs() + 3600;
        let a = t.connect_granted("w", 80, "g1", far);
        let b = t.connect_granted("w", 80, "g1", far);
        let other = t.connect_granted("w", 80, "g2", far);
        let plain = t.connect("w", 80);
        assert_eq!(t.revoke_grant("g1"), 2);
        a.closed().await;
        b.closed().await;
        let still = |c: &Connection| {
            let c = c.closed();
            async move {
                tokio::time::timeout(std::time::Duration::from_millis(50), c)
                    .await
                    .is_err()
            }
        };
        assert!(still(&other).await, "another grant's connection goes on");
        assert!(still(&plain).await, "an operator's connection goes on");
        drop((a, b));
        assert_eq!(t.revoke_grant("g1"), 0, "nothing left of g1");
        drop(other);
        assert!(
            t.grants.lock().unwrap().is_empty(),
            "entries go with their connections"
        );
        // Expired: ends at once.
        let gone = t.connect_granted("w", 80, "g3", crate::server::preview::now_secs() - 1);
        gone.closed().await;
    }
}
