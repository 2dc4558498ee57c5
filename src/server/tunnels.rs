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

/// Every open tunnel of this server.
#[derive(Clone, Default)]
pub struct Tunnels {
    open: Arc<Mutex<HashMap<Key, Entry>>>,
}

/// One connection through a tunnel; counted while held.
pub struct Connection {
    key: Key,
    open: Arc<Mutex<HashMap<Key, Entry>>>,
    to_worker: Arc<AtomicU64>,
    from_worker: Arc<AtomicU64>,
    closed: CancellationToken,
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

    /// Completes when an operator closes the tunnel.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.closed.clone().cancelled_owned()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
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
}
