//! Which execs wait for a client to re-attach and which a client connection
//! holds: a pure table, with its own lock in the hub (an attach never waits
//! on the node and worker registries, nor they on it).

use std::collections::HashMap;
use tokio_util::sync::CancellationToken;

/// (node, channel): an exec's channel on its node.
pub(super) type Key = (String, u32);

/// What the table needs of a waiting exec.
pub(super) trait OfWorker {
    fn worker_id(&self) -> &str;
    /// Who started it (an operator API caller's name); `None` for one
    /// whose starter is not known (adopted after a restart).
    fn owner(&self) -> Option<&str> {
        None
    }
}

/// Why a take found nothing.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Missing {
    /// Nothing waits on that channel.
    Nothing,
    /// An exec waits there, of another worker.
    OtherWorker,
}

pub(super) struct Attachments<T> {
    /// Execs waiting for their client, with the generation of their timer.
    detached: HashMap<Key, (u64, T)>,
    /// Execs a client connection holds: the generation of the hold, the
    /// worker, its owner, and the token that makes that connection hand it
    /// back.
    held: HashMap<Key, (u64, String, Option<String>, CancellationToken)>,
    next: u64,
}

impl<T> Default for Attachments<T> {
    fn default() -> Self {
        Attachments {
            detached: HashMap::new(),
            held: HashMap::new(),
            next: 0,
        }
    }
}

impl<T: OfWorker> Attachments<T> {
    fn generation(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Keeps `exec` waiting on `key`; the generation its timer names.
    pub(super) fn detach(&mut self, key: Key, exec: T) -> u64 {
        let g = self.generation();
        self.detached.insert(key, (g, exec));
        g
    }

    /// The exec's grace ran out: it leaves, if it is still the one of that
    /// timer (a re-attach and a new detach make another).
    pub(super) fn expire(&mut self, key: &Key, generation: u64) -> Option<T> {
        match self.detached.get(key) {
            Some((g, _)) if *g == generation => self.detached.remove(key).map(|(_, t)| t),
            _ => None,
        }
    }

    /// A client connection holds the exec now; an older holder's token is
    /// cancelled so that it hands the exec back. The hold's generation.
    pub(super) fn hold(
        &mut self,
        key: Key,
        worker_id: &str,
        owner: Option<&str>,
        token: CancellationToken,
    ) -> u64 {
        let g = self.generation();
        let held = (g, worker_id.to_string(), owner.map(String::from), token);
        if let Some((_, _, _, old)) = self.held.insert(key, held) {
            old.cancel();
        }
        g
    }

    /// A hold ends, unless a newer one replaced it.
    pub(super) fn release(&mut self, key: &Key, generation: u64) {
        if self
            .held
            .get(key)
            .is_some_and(|(g, _, _, _)| *g == generation)
        {
            self.held.remove(key);
        }
    }

    /// The token of the connection holding `worker_id`'s exec on `key`.
    pub(super) fn holder(&self, key: &Key, worker_id: &str) -> Option<CancellationToken> {
        match self.held.get(key) {
            Some((_, w, _, t)) if w == worker_id => Some(t.clone()),
            _ => None,
        }
    }

    /// Whether a client can re-attach to `worker_id`'s exec on `key`: it
    /// waits, or a connection holds it, and `may(its owner)` holds.
    pub(super) fn attachable_by(
        &self,
        key: &Key,
        worker_id: &str,
        may: impl Fn(Option<&str>) -> bool,
    ) -> bool {
        match (self.detached.get(key), self.held.get(key)) {
            (Some((_, d)), _) if d.worker_id() == worker_id => may(d.owner()),
            (_, Some((_, w, owner, _))) if w == worker_id => may(owner.as_deref()),
            _ => false,
        }
    }

    /// Takes `worker_id`'s waiting exec on `key` for a re-attaching client.
    pub(super) fn take(&mut self, key: &Key, worker_id: &str) -> Result<T, Missing> {
        match self.detached.remove(key) {
            Some((_, d)) if d.worker_id() == worker_id => Ok(d),
            Some(other) => {
                self.detached.insert(key.clone(), other);
                Err(Missing::OtherWorker)
            }
            None => Err(Missing::Nothing),
        }
    }

    /// The node was forgotten: its waiting execs go (returned, to be
    /// dropped outside the lock).
    pub(super) fn forget_node(&mut self, node_id: &str) -> Vec<T> {
        let keys: Vec<Key> = self
            .detached
            .keys()
            .filter(|(n, _)| n == node_id)
            .cloned()
            .collect();
        keys.iter()
            .filter_map(|k| self.detached.remove(k).map(|(_, t)| t))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E(&'static str);
    impl OfWorker for E {
        fn worker_id(&self) -> &str {
            self.0
        }
    }

    fn key(c: u32) -> Key {
        ("n".into(), c)
    }

    #[test]
    fn a_detached_exec_is_taken_by_its_own_worker_only() {
        let mut a = Attachments::default();
        a.detach(key(1), E("w1"));
        assert!(a.attachable_by(&key(1), "w1", |_| true));
        assert!(!a.attachable_by(&key(1), "w2", |_| true));
        assert_eq!(a.take(&key(1), "w2").err(), Some(Missing::OtherWorker));
        assert!(
            a.take(&key(1), "w1").is_ok(),
            "still there after the refusal"
        );
        assert_eq!(a.take(&key(1), "w1").err(), Some(Missing::Nothing));
    }

    #[test]
    fn an_exec_answers_who_owns_it_waiting_or_held() {
        let mut a = Attachments::<E>::default();
        let is = |who: &'static str| move |o: Option<&str>| o == Some(who);
        a.hold(key(1), "w", Some("token:a"), CancellationToken::new());
        assert!(a.attachable_by(&key(1), "w", is("token:a")));
        assert!(!a.attachable_by(&key(1), "w", is("token:b")));
        assert!(!a.attachable_by(&key(1), "other", is("token:a")));
        assert!(!a.attachable_by(&key(2), "w", |_| true), "nothing there");
    }

    #[test]
    fn an_old_timer_does_not_expire_a_newer_detach() {
        let mut a = Attachments::default();
        let g1 = a.detach(key(1), E("w"));
        assert!(a.take(&key(1), "w").is_ok());
        let g2 = a.detach(key(1), E("w"));
        assert!(a.expire(&key(1), g1).is_none(), "the first timer is stale");
        assert!(a.expire(&key(1), g2).is_some());
        assert!(!a.attachable_by(&key(1), "w", |_| true));
    }

    #[test]
    fn a_newer_hold_cancels_the_older_and_survives_its_release() {
        let mut a: Attachments<E> = Attachments::default();
        let (t1, t2) = (CancellationToken::new(), CancellationToken::new());
        let g1 = a.hold(key(1), "w", None, t1.clone());
        assert!(
            a.attachable_by(&key(1), "w", |_| true),
            "a held exec can be taken over"
        );
        let g2 = a.hold(key(1), "w", None, t2.clone());
        assert!(t1.is_cancelled() && !t2.is_cancelled());
        a.release(&key(1), g1);
        assert!(a.holder(&key(1), "w").is_some(), "the newer hold stays");
        assert!(a.holder(&key(1), "other").is_none());
        a.release(&key(1), g2);
        assert!(a.holder(&key(1), "w").is_none());
    }

    #[test]
    fn forgetting_a_node_drops_only_its_execs() {
        let mut a = Attachments::default();
        a.detach(("n1".into(), 1), E("a"));
        a.detach(("n1".into(), 2), E("b"));
        a.detach(("n2".into(), 1), E("c"));
        assert_eq!(a.forget_node("n1").len(), 2);
        assert!(a.attachable_by(&("n2".into(), 1), "c", |_| true));
    }
}
