//! Figure 8: tunnels. A worker's HTTP server reached through a tunnel
//! (the hub's, as `tether ctl port-forward` carries it, and the server's
//! preview route as a browser uses it) against a TCP connection from the
//! host straight to the worker's address, interleaved in one run.

use crate::figures::{Bench, alternate, cmd, limit, mb_s, secs_ms};
use crate::stats::{Figure, median, paired_differences};
use anyhow::{Context, ensure};
use std::time::{Duration, Instant};
use tether::protocol::SpawnRequest;
use tether::server::{Duplex, StreamEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 8080;

/// Connections at once in the stall figure.
const BURST: usize = 200;

/// `GET path` over raw HTTP/1.0 on a tunnel (side 0), straight to `ip`
/// (1), or through `relay` (2): the time to the first byte and to the end,
/// and the bytes read.
async fn get(
    b: &Bench,
    worker: &str,
    ip: &str,
    side: usize,
    path: &str,
    relay: Option<std::net::SocketAddr>,
) -> anyhow::Result<(Duration, Duration, u64)> {
    let req = format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n");
    let t0 = Instant::now();
    let mut first = None;
    let mut n = 0u64;
    if side == 0 {
        let t = b.t.hub.tunnel(worker, PORT).await?;
        (first, n) = fetch(t, &req, t0).await?;
    } else {
        let mut s = match relay.filter(|_| side == 2) {
            Some(r) => tokio::net::TcpStream::connect(r).await?,
            None => tokio::net::TcpStream::connect((ip, PORT)).await?,
        };
        s.set_nodelay(true)?;
        s.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let k = s.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            first.get_or_insert_with(|| t0.elapsed());
            n += k as u64;
        }
    }
    Ok((first.context("no answer")?, t0.elapsed(), n))
}

/// Sends `req` on an open tunnel and reads the answer to its end: the time
/// from `t0` to its first byte, and its size.
async fn fetch(mut t: Duplex, req: &str, t0: Instant) -> anyhow::Result<(Option<Duration>, u64)> {
    let (mut first, mut n) = (None, 0u64);
    t.input.write(req.to_string().into()).await?;
    // The server's close then ends the tunnel (both directions done).
    t.input.close();
    while let Some(ev) = t.output.next().await {
        match ev {
            StreamEvent::Data(_, d) => {
                first.get_or_insert_with(|| t0.elapsed());
                n += d.len() as u64;
            }
            StreamEvent::End { error: Some(e), .. } => return Err(e.into()),
            StreamEvent::End { .. } => break,
            _ => {}
        }
    }
    Ok((first, n))
}

/// A plain TCP relay in this process to the worker's port (read 64 KiB,
/// write it on, each direction): the simplest process in the path, as a
/// reference for the tunnel's bulk rate. Its address.
async fn plain_relay(ip: &str) -> anyhow::Result<std::net::SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let to = (ip.to_string(), PORT);
    // Ends with the benchmark process.
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                let _ = c.set_nodelay(true);
                if let Ok(mut w) = tokio::net::TcpStream::connect(to).await {
                    let _ = w.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut w, 65536, 65536)
                        .await;
                }
            });
        }
    });
    Ok(addr)
}

impl Bench {
    pub async fn tunnels(&mut self) -> anyhow::Result<Vec<Figure>> {
        let size = self.p.file_bytes;
        let w = self
            .t
            .hub
            .spawn(SpawnRequest {
                image: self.image.clone(),
                cmd: cmd(&[
                    "sh",
                    "-c",
                    &format!(
                        "mkdir -p /www && head -c {size} /dev/zero > /www/big && \
                         head -c 1048576 /dev/zero > /www/mid && echo ok > /www/small && httpd -f -p {PORT} -h /www"
                    ),
                ]),
                node_id: Some(self.t.node.clone()),
                // An httpd process per connection of the burst.
                resources: tether::protocol::Resources {
                    pids: Some(4096),
                    memory_mb: Some(1024),
                    ..Default::default()
                },
                ..Default::default()
            })
            .await
            .context("spawn the tunnel worker")?;
        let worker = w.worker_id.clone();
        let r = self.tunnel_figures(&worker, w.ip.as_deref()).await;
        if let Err(e) = self.t.hub.remove(&worker, true).await {
            self.notes
                .push(format!("removing tunnel worker {worker} failed: {e}"));
        }
        r
    }

    async fn tunnel_figures(
        &mut self,
        worker: &str,
        ip: Option<&str>,
    ) -> anyhow::Result<Vec<Figure>> {
        let ip = ip.context("the tunnel worker has no address")?.to_string();
        // Until httpd answers and the file is whole.
        let t0 = Instant::now();
        loop {
            match get(self, worker, &ip, 1, "/big", None).await {
                Ok((_, _, n)) if n > self.p.file_bytes => break,
                _ if t0.elapsed() > Duration::from_secs(60) => {
                    anyhow::bail!("the tunnel worker's httpd never served /big")
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let relay = plain_relay(&ip).await?;
        let (this, worker, ip) = (&*self, worker, ip.as_str());
        let size = this.p.file_bytes;
        let ([t, d, r], _) = alternate(
            this.p.file_reps,
            || async { Ok(()) },
            |side| async move {
                let got = get(this, worker, ip, side, "/big", Some(relay));
                let (_, dt, n) = limit(300, "tunnel bulk", got).await?;
                ensure!(n > size, "bulk GET read {n} bytes");
                Ok(mb_s(n, dt))
            },
        )
        .await?;
        let n = this.p.rtt_n / 2;
        let ([tc, dc], _) = alternate(
            n,
            || async { Ok(()) },
            |side| async move {
                let (first, _, _) = limit(
                    30,
                    "tunnel connect",
                    get(this, worker, ip, side, "/small", None),
                )
                .await?;
                Ok(secs_ms(first))
            },
        )
        .await?;
        let direct_url = format!("http://{ip}:{PORT}/small");
        let ([tp, dp], _) = alternate(
            n,
            || async { Ok(()) },
            |side| {
                let direct_url = direct_url.clone();
                async move {
                    let (dt, _) = if side == 0 {
                        this.t.api.preview_get(worker, PORT, "/small").await?
                    } else {
                        this.t.api.http_get(direct_url, false).await?
                    };
                    Ok(secs_ms(dt))
                }
            },
        )
        .await?;
        // Many connections at once, beside one whose reader stalls.
        let mut plain = Vec::new();
        let mut stalled = Vec::new();
        for round in 0..6 {
            let stall = round % 2 == 1;
            let s = limit(300, "tunnel burst", this.tunnel_burst(worker, stall)).await?;
            if stall {
                stalled.push(s)
            } else {
                plain.push(s)
            }
        }
        Ok(vec![
            Figure::new("tunnel_throughput_mb_s", "MB/s", median(&t), median(&d)),
            // What any hop that carries the bytes through a process of its
            // own reaches on this machine: the bound of a tunnel's rate.
            Figure::new("tunnel_plain_relay_mb_s", "MB/s", median(&r), median(&d)),
            Figure::new("tunnel_connect_p50_ms", "ms", median(&tc), median(&dc)),
            Figure::solo(
                "tunnel_connect_added_ms",
                "ms",
                median(&paired_differences(&tc, &dc)),
            ),
            Figure::new("preview_http_rtt_p50_ms", "ms", median(&tp), median(&dp)),
            Figure::solo(
                "preview_http_rtt_added_ms",
                "ms",
                median(&paired_differences(&tp, &dp)),
            ),
            Figure::solo(&format!("tunnel_{BURST}_conn_s"), "s", median(&plain)),
            Figure::solo(
                &format!("tunnel_{BURST}_conn_stalled_s"),
                "s",
                median(&stalled),
            ),
        ])
    }

    /// [`BURST`] tunnel connections at once, each a `GET` of 1 MiB, with
    /// (`stall`) one more connection whose reader never reads, opened first:
    /// the seconds until all of them have their file.
    async fn tunnel_burst(&self, worker: &str, stall: bool) -> anyhow::Result<f64> {
        let _stalled = if stall {
            let mut t = self.t.hub.tunnel(worker, PORT).await?;
            t.input
                .write("GET /big HTTP/1.0\r\nHost: bench\r\n\r\n".into())
                .await?;
            t.input.close();
            // Long enough for its window to fill.
            tokio::time::sleep(Duration::from_millis(200)).await;
            Some(t)
        } else {
            None
        };
        // Connected a few at a time (busybox httpd's listen backlog is 9),
        // then all at once.
        let gate = tokio::sync::Semaphore::new(8);
        let opened = futures_util::future::join_all((0..BURST).map(|_| async {
            let _turn = gate.acquire().await?;
            Ok::<_, anyhow::Error>(self.t.hub.tunnel(worker, PORT).await?)
        }))
        .await;
        let req = "GET /mid HTTP/1.0\r\nHost: bench\r\n\r\n";
        let t0 = Instant::now();
        let mut gets = Vec::new();
        for t in opened {
            gets.push(fetch(t?, req, t0));
        }
        for r in futures_util::future::join_all(gets).await {
            let (_, n) = r?;
            ensure!(n > 1_048_576, "a burst GET read {n} bytes");
        }
        Ok(t0.elapsed().as_secs_f64())
    }
}
