//! The server's heartbeat for every agent connection: one task and one timer
//! for all of them, instead of a timer per connection. The nodes are spread
//! over [`SLICES`] slices; every `interval / SLICES` the next slice is swept:
//! each of its connected agents gets a Ping, and one silent for longer than
//! the timeout has its connection ended. So every agent is pinged once per
//! interval and a dead link is found between *timeout* and *timeout +
//! interval* after its last traffic, as a per-connection timer would; an idle
//! connection's own task is woken only by what arrives.

use super::hub::Hub;
use crate::conn::{Close, Outbound};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Slices of one sweep (how finely the pings of all agents are spread).
pub(crate) const SLICES: u32 = 10;

/// Sweeps until `stop`.
pub(crate) async fn run(hub: Hub, interval: Duration, timeout: Duration, stop: CancellationToken) {
    let step = interval / SLICES;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + step, step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut slot = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        sweep(&hub, slot, timeout);
        slot = (slot + 1) % SLICES;
    }
}

fn sweep(hub: &Hub, slot: u32, timeout: Duration) {
    for link in hub.connected_in_slice(slot) {
        let silence = link.silence();
        if silence > timeout {
            link.end_connection(Close::new(
                Close::NORMAL,
                format!("no heartbeat for {} s", silence.as_secs()),
            ));
        } else {
            link.link().send(Outbound::Ping);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[tokio::test(start_paused = true)]
    async fn every_connected_agent_is_pinged_once_per_interval_and_a_silent_one_dropped() {
        let hub = Hub::new();
        let mut outs = Vec::new();
        let mut ends = Vec::new();
        for n in 0..25 {
            let id = format!("n{n}");
            let link = hub.node_link(&id);
            let (tx, rx) = mpsc::unbounded_channel();
            link.link().set(Some(tx.clone()));
            let (ended, _) = link.connect(&[], tx);
            hub.attach(&id, "test", None, None);
            outs.push(rx);
            ends.push((link, ended));
        }
        let stop = CancellationToken::new();
        let interval = Duration::from_secs(5);
        let sweeper = tokio::spawn(run(
            hub.clone(),
            interval,
            Duration::from_secs(20),
            stop.clone(),
        ));
        // Three intervals, while every agent but the first keeps talking.
        for _ in 0..30 {
            tokio::time::sleep(interval / SLICES).await;
            for (link, _) in &ends[1..] {
                link.seen();
            }
        }
        // Half a step more: the sweep due at the last instant has run.
        tokio::time::sleep(interval / SLICES / 2).await;
        for rx in &mut outs[1..] {
            let pings = std::iter::from_fn(|| rx.try_recv().ok())
                .filter(|o| matches!(o, Outbound::Ping))
                .count();
            assert_eq!(pings, 3);
        }
        assert!(ends.iter().all(|(_, e)| !e.is_cancelled()));
        // The first one was never heard: ended after 20-25 s of silence.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (first, ended) = &ends[0];
        assert!(ended.is_cancelled());
        let reason = first.end_reason();
        assert!(
            reason.reason.starts_with("no heartbeat for 2"),
            "{reason:?}"
        );
        stop.cancel();
        sweeper.await.unwrap();
    }
}
