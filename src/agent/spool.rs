//! The output spool: what an exec prints while the server is unreachable.
//!
//! While connected, exec output goes straight to its channel within credit,
//! and a reader that stalls back-pressures the process (nothing is lost).
//! While disconnected, the agent keeps reading so the process is not held up
//! by an absent server: output goes to the spool, in memory up to
//! `memory_bytes` per channel, then to a file under `state_dir/spool`, up to
//! a disk quota shared by all channels. Beyond the quota output is dropped
//! and a gap marker (a [`StreamKind::Gap`] frame holding the count) takes
//! its place in the stream, so the reader learns exactly how much is
//! missing. After a reconnect the spool drains, in order, within credit;
//! new output queues behind it (back-pressured once the spool is full).
//!
//! File reads and writes run on the blocking pool: the agent's runtime has
//! one thread, and a slow disk must not hold up every other channel exactly
//! while the server is away.

use crate::channel::ChannelWriter;
use crate::protocol::StreamKind;
use bytes::Bytes;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::warn;

/// Where and how much the spool may hold.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory of the spool files (emptied when the agent starts).
    pub dir: PathBuf,
    /// Bytes each channel keeps in memory before it writes to a file.
    pub memory_bytes: usize,
    /// Disk bytes all channels together may hold.
    pub quota_bytes: u64,
}

impl SpoolConfig {
    pub const DEFAULT_MEMORY_BYTES: usize = 256 * 1024;
    pub const DEFAULT_QUOTA_BYTES: u64 = 1024 * 1024 * 1024;

    pub fn new(state_dir: &std::path::Path) -> Self {
        SpoolConfig {
            dir: state_dir.join("spool"),
            memory_bytes: Self::DEFAULT_MEMORY_BYTES,
            quota_bytes: Self::DEFAULT_QUOTA_BYTES,
        }
    }
}

/// The spool settings and the disk quota in use, shared by all channels.
pub struct Spools {
    cfg: SpoolConfig,
    used: AtomicU64,
}

impl Spools {
    /// Starts with an empty spool directory: what an earlier agent process
    /// spooled belongs to execs that ended with it.
    pub fn new(cfg: SpoolConfig) -> Arc<Self> {
        let _ = std::fs::remove_dir_all(&cfg.dir);
        Arc::new(Spools {
            cfg,
            used: AtomicU64::new(0),
        })
    }

    /// Disk bytes held by all spools now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    fn reserve(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.cfg.quota_bytes).then_some(u + n)
            })
            .is_ok()
    }

    fn release(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

enum Record {
    Mem(StreamKind, Bytes),
    /// This many bytes at the file's read position.
    File(StreamKind, u64),
    /// Bytes dropped here.
    Gap(u64),
}

/// What [`Spool::push`] did with the data.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Stored,
    /// No room: dropped and counted in a gap marker.
    Dropped,
    /// No room, and dropping was not allowed: the data is left to the caller.
    Full,
}

/// One channel's spool.
pub struct Spool {
    shared: Arc<Spools>,
    name: String,
    records: VecDeque<Record>,
    mem_bytes: usize,
    file: Option<Arc<File>>,
    /// Bytes written to the file since it was last emptied (all reserved
    /// from the quota) and the position of the next byte to read.
    written: u64,
    read: u64,
    /// Records in `records` that live in the file.
    file_records: usize,
    /// Bytes dropped in all, for the log.
    pub dropped: u64,
}

impl Spool {
    pub fn new(shared: Arc<Spools>, channel: u32) -> Self {
        Spool {
            shared,
            name: format!("{}-{channel}.spool", ulid::Ulid::new()),
            records: VecDeque::new(),
            mem_bytes: 0,
            file: None,
            written: 0,
            read: 0,
            file_records: 0,
            dropped: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Stores `data` behind what is spooled. Without room it is dropped (a
    /// gap) if `may_drop`, or else left in `data` ([`Pushed::Full`]).
    pub async fn push(&mut self, kind: StreamKind, data: &mut Bytes, may_drop: bool) -> Pushed {
        let n = data.len();
        // Once output is being dropped, what follows is dropped too, until
        // the gap has gone out: one gap per outage, not a ragged stream.
        let dropping = may_drop && matches!(self.records.back(), Some(Record::Gap(_)));
        if !dropping && self.store(kind, data).await {
            return Pushed::Stored;
        }
        if !may_drop {
            return Pushed::Full;
        }
        self.dropped += n as u64;
        *data = Bytes::new();
        if let Some(Record::Gap(g)) = self.records.back_mut() {
            *g += n as u64;
        } else {
            self.records.push_back(Record::Gap(n as u64));
        }
        Pushed::Dropped
    }

    /// Keeps `data` in memory or in the file if either has room.
    async fn store(&mut self, kind: StreamKind, data: &mut Bytes) -> bool {
        let n = data.len();
        if self.mem_bytes + n <= self.shared.cfg.memory_bytes {
            self.mem_bytes += n;
            self.records
                .push_back(Record::Mem(kind, std::mem::take(data)));
            return true;
        }
        if !self.shared.reserve(n as u64) {
            return false;
        }
        match self.append(data.clone()).await {
            Ok(()) => {
                self.written += n as u64;
                self.file_records += 1;
                self.records.push_back(Record::File(kind, n as u64));
                *data = Bytes::new();
                true
            }
            Err(e) => {
                self.shared.release(n as u64);
                warn!(error = %e, dir = %self.shared.cfg.dir.display(), "cannot write the output spool");
                false
            }
        }
    }

    async fn append(&mut self, data: Bytes) -> std::io::Result<()> {
        let file = match &self.file {
            Some(f) => f.clone(),
            None => {
                let path = self.shared.cfg.dir.join(&self.name);
                let f = Arc::new(blocking(move || open_unlinked(&path)).await?);
                self.file = Some(f.clone());
                f
            }
        };
        let at = self.written;
        blocking(move || file.write_all_at(&data, at)).await
    }

    /// Credit the first record needs before anything can go: a gap marker
    /// goes whole.
    pub fn need(&self) -> u64 {
        match self.records.front() {
            Some(Record::Gap(_)) => 8,
            _ => 1,
        }
    }

    /// Sends spooled records within the writer's credit, in order.
    pub async fn drain(&mut self, writer: &mut ChannelWriter) -> std::io::Result<()> {
        while !self.records.is_empty() && writer.available() >= self.need() {
            let avail = writer.available();
            match self.records.front_mut().expect("not empty") {
                Record::Mem(kind, b) => {
                    let before = b.len();
                    writer.send_available(*kind, b);
                    self.mem_bytes -= before - b.len();
                    if b.is_empty() {
                        self.records.pop_front();
                    }
                }
                Record::File(kind, left) => {
                    let n = (*left).min(avail).min(256 * 1024);
                    let file = self.file.clone().expect("file records have a file");
                    let at = self.read;
                    let mut b = blocking(move || {
                        let mut buf = vec![0u8; n as usize];
                        file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
                    })
                    .await?;
                    writer.send_available(*kind, &mut b);
                    self.read += n;
                    *left -= n;
                    if *left == 0 {
                        self.records.pop_front();
                        self.file_records -= 1;
                        if self.file_records == 0 {
                            self.empty_file().await?;
                        }
                    }
                }
                Record::Gap(g) => {
                    let mut b = Bytes::copy_from_slice(&g.to_be_bytes());
                    writer.send_available(StreamKind::Gap, &mut b);
                    self.records.pop_front();
                }
            }
        }
        Ok(())
    }

    /// Everything in the file was sent: give its space back.
    async fn empty_file(&mut self) -> std::io::Result<()> {
        self.shared.release(self.written);
        self.written = 0;
        self.read = 0;
        if let Some(f) = self.file.clone() {
            blocking(move || f.set_len(0)).await?;
        }
        Ok(())
    }
}

/// Opens a new spool file and unlinks it at once: its data dies with the
/// process or the spool.
fn open_unlinked(path: &std::path::Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    std::fs::remove_file(path)?;
    Ok(file)
}

/// Runs file I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.shared.release(self.written);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Channels;
    use crate::conn::{Link, Outbound};
    use crate::protocol::{Frame, Window};
    use tokio::sync::mpsc;

    fn spools(dir: &std::path::Path, memory: usize, quota: u64) -> Arc<Spools> {
        Spools::new(SpoolConfig {
            dir: dir.join("spool"),
            memory_bytes: memory,
            quota_bytes: quota,
        })
    }

    async fn push(s: &mut Spool, kind: StreamKind, data: &'static [u8], may_drop: bool) -> Pushed {
        s.push(kind, &mut Bytes::from_static(data), may_drop).await
    }

    /// The frames sent so far, as (stream, payload).
    fn frames(rx: &mut mpsc::UnboundedReceiver<Outbound>) -> Vec<(StreamKind, Vec<u8>)> {
        let mut v = Vec::new();
        while let Ok(o) = rx.try_recv() {
            if let Outbound::Binary(b) = o {
                let f = Frame::decode(b, 1 << 20).unwrap();
                v.push((f.stream, f.payload.to_vec()));
            }
        }
        v
    }

    #[tokio::test]
    async fn memory_then_file_then_gap_drain_in_order_and_free_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let shared = spools(dir.path(), 4, 6);
        let mut s = Spool::new(shared.clone(), 1);
        assert_eq!(
            push(&mut s, StreamKind::Stdout, b"abcd", true).await,
            Pushed::Stored
        ); // memory
        assert_eq!(
            push(&mut s, StreamKind::Stderr, b"efg", true).await,
            Pushed::Stored
        ); // file
        assert_eq!(
            push(&mut s, StreamKind::Stdout, b"hij", true).await,
            Pushed::Stored
        ); // file: quota now full
        assert_eq!(
            push(&mut s, StreamKind::Stdout, b"k", false).await,
            Pushed::Full
        );
        assert_eq!(
            push(&mut s, StreamKind::Stdout, b"kl", true).await,
            Pushed::Dropped
        );
        assert_eq!(
            push(&mut s, StreamKind::Stdout, b"mno", true).await,
            Pushed::Dropped
        );
        assert_eq!(shared.used(), 6);
        assert_eq!(s.dropped, 5);

        let (out, mut rx) = mpsc::unbounded_channel();
        let link = Link::new();
        link.set(Some(out));
        let ch = Channels::new(link);
        let mut h = ch.open(1, 8).unwrap();
        // 8 bytes of credit: "abcd", then 4 of the file's 6.
        s.drain(&mut h.writer).await.unwrap();
        assert_eq!(
            frames(&mut rx),
            vec![
                (StreamKind::Stdout, b"abcd".to_vec()),
                (StreamKind::Stderr, b"efg".to_vec()),
                (StreamKind::Stdout, b"h".to_vec()),
            ]
        );
        assert_eq!(s.need(), 1);
        let grant = |acked| {
            ch.on_window(Window {
                channel: 1,
                acked,
                limit: acked + 8,
            })
        };
        grant(8);
        s.drain(&mut h.writer).await.unwrap();
        assert_eq!(shared.used(), 0, "the emptied file gives its quota back");
        // "ij" took 2 of 8: the gap marker needs 8 and waits.
        assert_eq!(s.need(), 8);
        grant(16);
        s.drain(&mut h.writer).await.unwrap();
        assert!(s.is_empty());
        assert_eq!(
            frames(&mut rx),
            vec![
                (StreamKind::Stdout, b"ij".to_vec()),
                (StreamKind::Gap, 5u64.to_be_bytes().to_vec()),
            ]
        );
    }

    #[tokio::test]
    async fn once_dropping_small_chunks_do_not_slip_in_behind_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::new(spools(dir.path(), 8, 0), 1);
        assert_eq!(
            push(&mut s, StreamKind::Stdout, b"123456", true).await,
            Pushed::Stored
        );
        assert_eq!(
            push(&mut s, StreamKind::Stdout, b"7890", true).await,
            Pushed::Dropped
        );
        // It would fit in memory, but it belongs after the dropped bytes.
        assert_eq!(
            push(&mut s, StreamKind::Stdout, b"a", true).await,
            Pushed::Dropped
        );
        // Connected again (no dropping): stored behind the gap.
        assert_eq!(
            push(&mut s, StreamKind::Stdout, b"b", false).await,
            Pushed::Stored
        );
        assert_eq!(s.dropped, 5);
        assert_eq!(s.records.len(), 3);
    }

    #[tokio::test]
    async fn quota_is_shared_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let shared = spools(dir.path(), 0, 10);
        let mut a = Spool::new(shared.clone(), 1);
        let mut b = Spool::new(shared.clone(), 2);
        assert_eq!(
            a.push(StreamKind::Stdout, &mut Bytes::from(vec![0u8; 8]), false)
                .await,
            Pushed::Stored
        );
        let mut rest = Bytes::from(vec![0u8; 8]);
        assert_eq!(
            b.push(StreamKind::Stdout, &mut rest, false).await,
            Pushed::Full
        );
        assert_eq!(rest.len(), 8, "data is left to the caller");
        drop(a);
        assert_eq!(shared.used(), 0);
        assert_eq!(
            b.push(StreamKind::Stdout, &mut rest, false).await,
            Pushed::Stored
        );
        // Spool files are unlinked at once: nothing lies in the directory.
        assert_eq!(
            std::fs::read_dir(dir.path().join("spool")).unwrap().count(),
            0
        );
    }
}
