//! Figure 8: tunnels. A worker's HTTP server reached through a tunnel
//! (the hub's, as `tether ctl port-forward` carries it, and the server's
//! preview route as a browser uses it) against a TCP connection from the
//! host straight to the worker's address, interleaved in one run.

use crate::figures::{Bench, alternate, cmd, limit, mb_s, secs_ms};
use crate::stats::{Figure, median};
use anyhow::{Context, ensure};
use std::time::{Duration, Instant};
use tether::protocol::SpawnRequest;
use tether::server::StreamEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 8080;

/// `GET path` over raw HTTP/1.0 on `tunnel` (0) or straight to `ip` (1):
/// the time to the first byte and to the end, and the bytes read.
async fn get(
    b: &Bench,
    worker: &str,
    ip: &str,
    side: usize,
    path: &str,
) -> anyhow::Result<(Duration, Duration, u64)> {
    let req = format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n");
    let t0 = Instant::now();
    let mut first = None;
    let mut n = 0u64;
    if side == 0 {
        let mut t = b.t.hub.tunnel(worker, PORT).await?;
        t.input.write(req.into()).await?;
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
    } else {
        let mut s = tokio::net::TcpStream::connect((ip, PORT)).await?;
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
                         echo ok > /www/small && httpd -f -p {PORT} -h /www"
                    ),
                ]),
                node_id: Some(self.t.node.clone()),
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
            match get(self, worker, &ip, 1, "/big").await {
                Ok((_, _, n)) if n > self.p.file_bytes => break,
                _ if t0.elapsed() > Duration::from_secs(60) => {
                    anyhow::bail!("the tunnel worker's httpd never served /big")
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let (this, worker, ip) = (&*self, worker, ip.as_str());
        let size = this.p.file_bytes;
        let ([t, d], _) = alternate(
            this.p.file_reps,
            || async { Ok(()) },
            |side| async move {
                let (_, dt, n) =
                    limit(300, "tunnel bulk", get(this, worker, ip, side, "/big")).await?;
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
                let (first, _, _) =
                    limit(30, "tunnel connect", get(this, worker, ip, side, "/small")).await?;
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
        let added =
            |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
        Ok(vec![
            Figure::new("tunnel_throughput_mb_s", "MB/s", median(&t), median(&d)),
            Figure::new("tunnel_connect_p50_ms", "ms", median(&tc), median(&dc)),
            Figure::solo("tunnel_connect_added_ms", "ms", median(&added(&tc, &dc))),
            Figure::new("preview_http_rtt_p50_ms", "ms", median(&tp), median(&dp)),
            Figure::solo("preview_http_rtt_added_ms", "ms", median(&added(&tp, &dp))),
        ])
    }
}
