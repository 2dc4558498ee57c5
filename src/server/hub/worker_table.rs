//! The server's view of every worker, indexed by node as well, so that what
//! one node does (connecting with its inventory, being forgotten, counting
//! its workers) costs that node's workers, not every worker of the fleet.

use crate::protocol::WorkerInfo;
use std::collections::{HashMap, HashSet};

#[derive(Default)]
pub(super) struct WorkerTable {
    by_id: HashMap<String, WorkerInfo>,
    by_node: HashMap<String, HashSet<String>>,
}

impl WorkerTable {
    pub(super) fn get(&self, worker_id: &str) -> Option<&WorkerInfo> {
        self.by_id.get(worker_id)
    }

    /// Changes a worker in place; its node stays what it was.
    pub(super) fn update(&mut self, worker_id: &str, f: impl FnOnce(&mut WorkerInfo)) {
        if let Some(w) = self.by_id.get_mut(worker_id) {
            let node = std::mem::take(&mut w.node_id);
            f(w);
            w.node_id = node;
        }
    }

    /// Adds or replaces a worker (on whatever node it names now).
    pub(super) fn insert(&mut self, w: WorkerInfo) {
        let id = w.worker_id.clone();
        self.unindex(&id);
        self.by_node
            .entry(w.node_id.clone())
            .or_default()
            .insert(id.clone());
        self.by_id.insert(id, w);
    }

    pub(super) fn remove(&mut self, worker_id: &str) -> Option<WorkerInfo> {
        self.unindex(worker_id);
        self.by_id.remove(worker_id)
    }

    fn unindex(&mut self, worker_id: &str) {
        let Some(old) = self.by_id.get(worker_id) else {
            return;
        };
        if let Some(ids) = self.by_node.get_mut(&old.node_id) {
            ids.remove(worker_id);
            if ids.is_empty() {
                self.by_node.remove(&old.node_id);
            }
        }
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &WorkerInfo> {
        self.by_id.values()
    }

    /// The workers of one node.
    pub(super) fn of_node<'a>(&'a self, node_id: &str) -> impl Iterator<Item = &'a WorkerInfo> {
        self.by_node
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.by_id.get(id))
    }

    pub(super) fn count(&self, node_id: &str) -> usize {
        self.by_node.get(node_id).map_or(0, |ids| ids.len())
    }

    /// Removes the workers of `node_id` that `drop` picks.
    pub(super) fn remove_of_node(
        &mut self,
        node_id: &str,
        mut drop: impl FnMut(&WorkerInfo) -> bool,
    ) {
        let gone: Vec<String> = self
            .of_node(node_id)
            .filter(|w| drop(w))
            .map(|w| w.worker_id.clone())
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str, node: &str) -> WorkerInfo {
        serde_json::from_value(serde_json::json!({
            "worker_id": id, "node_id": node, "image": "i", "container_id": "c",
            "network": "n", "state": "running", "created_at": "2026-01-01T00:00:00Z",
        }))
        .unwrap()
    }

    fn ids<'a>(it: impl Iterator<Item = &'a WorkerInfo>) -> Vec<String> {
        let mut v: Vec<String> = it.map(|w| w.worker_id.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_node_index_follows_inserts_moves_and_removals() {
        let mut t = WorkerTable::default();
        t.insert(w("a", "n1"));
        t.insert(w("b", "n1"));
        t.insert(w("c", "n2"));
        assert_eq!((t.count("n1"), t.count("n2"), t.count("n3")), (2, 1, 0));
        // The same worker inserted again on another node moves there.
        t.insert(w("b", "n2"));
        assert_eq!(ids(t.of_node("n1")), ["a"]);
        assert_eq!(ids(t.of_node("n2")), ["b", "c"]);
        assert_eq!(t.remove("a").map(|w| w.node_id), Some("n1".to_string()));
        assert_eq!(t.count("n1"), 0);
        assert!(t.remove("a").is_none());
        t.remove_of_node("n2", |w| w.worker_id == "c");
        assert_eq!(ids(t.values()), ["b"]);
        assert_eq!(ids(t.of_node("n2")), ["b"]);
    }

    #[test]
    fn an_update_cannot_move_a_worker_off_its_node() {
        let mut t = WorkerTable::default();
        t.insert(w("a", "n1"));
        t.update("a", |w| {
            w.exit_code = Some(3);
            w.node_id = "n2".into();
        });
        assert_eq!(t.get("a").unwrap().exit_code, Some(3));
        assert_eq!(t.get("a").unwrap().node_id, "n1");
        assert_eq!(ids(t.of_node("n1")), ["a"]);
        t.update("missing", |_| panic!("not called"));
    }
}
