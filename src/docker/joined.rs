//! Joining the pieces Docker hands over before they are forwarded.

use crate::protocol::StreamKind;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Pieces of output, each of one stream kind.
pub type Pieces<E> = Pin<Box<dyn Stream<Item = Result<(StreamKind, Bytes), E>> + Send>>;

/// Pieces of at least this many bytes count as bulk output.
pub const BULK_PIECE: usize = 2048;

/// How long bulk output may wait for more before it is forwarded. Long
/// enough for Docker to hand over a full frame's worth at the rates a
/// 2-core machine moves (about 130 KB per millisecond), and the timer's
/// resolution besides.
pub const LINGER: Duration = Duration::from_millis(1);

/// What a chunk of bulk output does while it waits for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Stops reading until the linger ends, then joins all that arrived
    /// meanwhile: for a source that fills up on its own while nobody reads
    /// (an attached exec's hijacked socket), so one wake-up takes it all.
    Asleep,
    /// Goes on reading, joining each piece as it comes, until the chunk is
    /// full or the linger ends: for an HTTP body (logs, archives), which
    /// the client reads from the socket only when asked for the next piece,
    /// so a stream that stopped reading would stop it.
    Reading,
}

/// Docker's pieces of output joined into chunks of up to `max` bytes of one
/// stream kind, in order.
///
/// Docker hands bulk output over in pieces of a few KiB (an exec's output
/// as the process writes its pipe, an archive as the client reads its
/// body), and every piece forwarded on its own costs a frame, a WebSocket
/// write, a read on the server and a wake-up of each task on the way. So
/// when a piece of bulk size arrives and nothing more is ready yet, the
/// chunk waits up to `linger` for more ([`Wait`] says how). Small pieces (a
/// prompt, a line of text) and the last piece before the end go out at
/// once: interactive output is not delayed, bulk output at most by `linger`.
pub struct Joined<E> {
    inner: Pieces<E>,
    /// A piece read but not joined (another stream, or no room left).
    held: Option<(StreamKind, Bytes)>,
    /// An error read after the chunk being built: reported next.
    error: Option<E>,
    ended: bool,
    kind: StreamKind,
    /// The chunk being built: its pieces, joined only if there are several.
    parts: Vec<Bytes>,
    len: usize,
    max: usize,
    bulk: usize,
    linger: Duration,
    wait: Wait,
    timer: Pin<Box<Sleep>>,
    /// The chunk waits for more until the timer fires.
    lingering: bool,
    /// This chunk waited once already: send what it has.
    lingered: bool,
}

impl<E> Joined<E> {
    /// Pieces joined for forwarding in chunks of up to `max` bytes, with the
    /// agent's bulk threshold ([`BULK_PIECE`]) and wait ([`LINGER`]).
    pub fn forwarded(inner: Pieces<E>, max: usize, wait: Wait) -> Joined<E> {
        Joined::new(inner, max, BULK_PIECE, LINGER, wait)
    }

    /// Pieces of at least `bulk` bytes may wait up to `linger` for more.
    pub fn new(
        inner: Pieces<E>,
        max: usize,
        bulk: usize,
        linger: Duration,
        wait: Wait,
    ) -> Joined<E> {
        Joined {
            inner,
            held: None,
            error: None,
            ended: false,
            kind: StreamKind::Stdout,
            parts: Vec::new(),
            len: 0,
            max,
            bulk,
            linger,
            wait,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            lingering: false,
            lingered: false,
        }
    }

    fn take(&mut self) -> (StreamKind, Bytes) {
        self.lingered = false;
        let data = if self.parts.len() == 1 {
            self.parts.pop().unwrap_or_default()
        } else {
            let mut b = BytesMut::with_capacity(self.len);
            for p in self.parts.drain(..) {
                b.extend_from_slice(&p);
            }
            b.freeze()
        };
        self.len = 0;
        (self.kind, data)
    }

    /// Adds a piece to the chunk if it belongs there; else holds it.
    fn add(&mut self, kind: StreamKind, data: Bytes) {
        if self.parts.is_empty() {
            self.kind = kind;
        } else if kind != self.kind || self.len + data.len() > self.max {
            self.held = Some((kind, data));
            return;
        }
        self.len += data.len();
        self.parts.push(data);
    }
}

impl<E: Unpin> Stream for Joined<E> {
    type Item = Result<(StreamKind, Bytes), E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.lingering && this.wait == Wait::Asleep {
                ready!(this.timer.as_mut().poll(cx));
                this.lingering = false;
                this.lingered = true;
            }
            // Take in what is ready, up to a full chunk.
            let mut waiting = false;
            while this.held.is_none() && this.error.is_none() && !this.ended && this.len < this.max
            {
                match this.inner.as_mut().poll_next(cx) {
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                    Poll::Ready(None) => this.ended = true,
                    Poll::Ready(Some(Err(e))) => this.error = Some(e),
                    Poll::Ready(Some(Ok((kind, data)))) => {
                        if !data.is_empty() {
                            this.add(kind, data);
                        }
                    }
                }
            }
            if this.parts.is_empty() {
                if let Some((kind, data)) = this.held.take() {
                    this.add(kind, data);
                    continue;
                }
                if let Some(e) = this.error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                if this.ended {
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            }
            if this.lingering {
                // Reading while it waits: until the chunk is full, the
                // stream ends or fails, or the timer fires.
                if waiting && this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.lingering = false;
                return Poll::Ready(Some(Ok(this.take())));
            }
            let bulk = this.parts.last().is_some_and(|p| p.len() >= this.bulk);
            if waiting && bulk && !this.lingered {
                let until = Instant::now() + this.linger;
                this.timer.as_mut().reset(until);
                this.lingering = true;
                continue;
            }
            return Poll::Ready(Some(Ok(this.take())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt};
    use tokio::sync::mpsc;

    type Item = Result<(StreamKind, Bytes), &'static str>;

    /// A stream of pieces fed by hand, and the joined stream over it.
    fn fed(max: usize, wait: Wait) -> (mpsc::UnboundedSender<Item>, Joined<&'static str>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        let inner = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (tx, Joined::new(Box::pin(inner), max, 1000, LINGER, wait))
    }

    /// `n` pieces of `size` bytes from a source that, like an HTTP body,
    /// has the next piece only some time after it was asked for one.
    fn read_when_asked(n: usize, size: usize) -> Pieces<&'static str> {
        let (mut left, mut asked) = (n, false);
        Box::pin(futures_util::stream::poll_fn(move |cx| {
            if left == 0 {
                return Poll::Ready(None);
            }
            if !asked {
                asked = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            asked = false;
            left -= 1;
            Poll::Ready(Some(Ok((StreamKind::Data, Bytes::from(vec![7; size])))))
        }))
    }

    fn out(n: usize, b: u8) -> Item {
        Ok((StreamKind::Stdout, Bytes::from(vec![b; n])))
    }

    fn err(n: usize, b: u8) -> Item {
        Ok((StreamKind::Stderr, Bytes::from(vec![b; n])))
    }

    /// The next chunk if one is ready now.
    fn now(j: &mut Joined<&'static str>) -> Option<Option<(StreamKind, usize)>> {
        j.next()
            .now_or_never()
            .map(|o| o.map(|r| r.map(|(k, b)| (k, b.len())).unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn small_pieces_go_out_at_once_bulk_waits_for_more() {
        let (tx, mut j) = fed(64 * 1024, Wait::Asleep);
        tx.send(out(10, b'a')).unwrap();
        assert_eq!(now(&mut j), Some(Some((StreamKind::Stdout, 10))));
        assert_eq!(now(&mut j), None, "nothing more yet");
        // A bulk piece waits for the linger; what arrives meanwhile joins it.
        tx.send(out(4000, b'b')).unwrap();
        assert_eq!(now(&mut j), None, "a bulk piece lingers");
        tx.send(out(3000, b'c')).unwrap();
        tokio::time::advance(Duration::from_micros(500)).await;
        assert_eq!(now(&mut j), None, "still within the linger");
        tokio::time::advance(Duration::from_micros(600)).await;
        let (kind, data) = j.next().await.unwrap().unwrap();
        assert_eq!(kind, StreamKind::Stdout);
        let mut want = vec![b'b'; 4000];
        want.extend(vec![b'c'; 3000]);
        assert_eq!(&data[..], &want[..]);
        // The end comes through once the sender is gone.
        drop(tx);
        assert_eq!(j.next().await.map(|r| r.is_ok()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_keep_streams_apart_in_order_and_within_max() {
        let (tx, mut j) = fed(10_000, Wait::Asleep);
        for _ in 0..3 {
            tx.send(out(4000, b'o')).unwrap();
        }
        tx.send(err(100, b'e')).unwrap();
        tx.send(out(5, b'p')).unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(r) = j.next().await {
            let (k, b) = r.unwrap();
            got.push((k, b.len()));
        }
        assert_eq!(
            got,
            [
                (StreamKind::Stdout, 8000),
                (StreamKind::Stdout, 4000),
                (StreamKind::Stderr, 100),
                (StreamKind::Stdout, 5),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_comes_after_the_data_before_it() {
        let (tx, mut j) = fed(64 * 1024, Wait::Reading);
        tx.send(out(3000, b'x')).unwrap();
        tx.send(Err("boom")).unwrap();
        let (_, data) = j.next().await.unwrap().unwrap();
        assert_eq!(data.len(), 3000);
        assert_eq!(j.next().await.unwrap(), Err("boom"));
    }

    /// While a bulk chunk waits, `Reading` joins what arrives and sends as
    /// soon as the chunk is full; `Asleep` takes it all when the timer fires.
    #[tokio::test(start_paused = true)]
    async fn reading_joins_while_it_waits_and_sends_when_full() {
        let (tx, mut j) = fed(10_000, Wait::Reading);
        tx.send(out(4000, b'a')).unwrap();
        assert_eq!(now(&mut j), None, "a bulk piece lingers");
        tx.send(out(3000, b'b')).unwrap();
        assert_eq!(now(&mut j), None, "room for more: still waiting");
        tokio::time::advance(Duration::from_micros(1100)).await;
        assert_eq!(now(&mut j), Some(Some((StreamKind::Stdout, 7000))));
        // A piece that does not fit sends the chunk at once and starts the next.
        tx.send(out(4000, b'c')).unwrap();
        tx.send(out(4000, b'd')).unwrap();
        assert_eq!(now(&mut j), None);
        tx.send(out(4000, b'e')).unwrap();
        assert_eq!(now(&mut j), Some(Some((StreamKind::Stdout, 8000))));
        assert_eq!(now(&mut j), None, "the last piece lingers");
        drop(tx);
        assert_eq!(now(&mut j), Some(Some((StreamKind::Stdout, 4000))));
        assert_eq!(now(&mut j), Some(None));
    }

    /// From a source read only when asked (an HTTP body), `Reading` fills a
    /// whole chunk without waiting for the timer; `Asleep` stops asking, so
    /// each chunk waits the full linger and gets little.
    #[tokio::test(start_paused = true)]
    async fn a_source_read_when_asked_fills_chunks_only_when_reading() {
        let t0 = Instant::now();
        let mut j = Joined::new(
            read_when_asked(16, 8192),
            65536,
            1000,
            LINGER,
            Wait::Reading,
        );
        let (_, data) = j.next().await.unwrap().unwrap();
        assert_eq!((data.len(), t0.elapsed()), (65536, Duration::ZERO));

        let t0 = Instant::now();
        let mut j = Joined::new(read_when_asked(16, 8192), 65536, 1000, LINGER, Wait::Asleep);
        let (_, data) = j.next().await.unwrap().unwrap();
        assert!(t0.elapsed() >= LINGER, "{:?}", t0.elapsed());
        assert!(data.len() < 65536, "{}", data.len());
    }

    /// Random pieces of two streams, fed with random pauses: each stream's
    /// bytes come out whole, in order, in chunks of at most `max`, however
    /// the chunks wait.
    #[tokio::test(start_paused = true)]
    async fn random_pieces_come_out_byte_exact() {
        for wait in [Wait::Asleep, Wait::Reading] {
            random_pieces(wait).await;
        }
    }

    async fn random_pieces(wait: Wait) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (tx, mut j) = fed(8192, wait);
        let mut sent: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut pieces = Vec::new();
        for i in 0..500u32 {
            let n = rng.random_range(1..5000);
            let b = (i % 251) as u8;
            let stderr = rng.random_bool(0.2);
            sent[stderr as usize].extend(std::iter::repeat_n(b, n));
            pieces.push((
                if stderr { err(n, b) } else { out(n, b) },
                rng.random_range(0..3u64),
            ));
        }
        let feeder = tokio::spawn(async move {
            for (p, pause) in pieces {
                tx.send(p).unwrap();
                if pause > 0 {
                    tokio::time::sleep(Duration::from_micros(pause * 400)).await;
                }
            }
        });
        let mut got: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        while let Some(r) = j.next().await {
            let (k, b) = r.unwrap();
            assert!(b.len() <= 8192, "chunk of {}", b.len());
            got[(k == StreamKind::Stderr) as usize].extend_from_slice(&b);
        }
        feeder.await.unwrap();
        assert_eq!(got, sent);
    }
}
