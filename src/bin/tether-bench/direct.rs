//! The baseline: the same operations with bollard straight against the
//! engine, no tether in between. Also the tar stream both sides upload.

use anyhow::{Context, bail};
use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, DownloadFromContainerOptions, ListContainersOptions,
    ListNetworksOptions, RemoveContainerOptions, UploadToContainerOptions,
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Label on every object the baseline creates (scripts/cleanup.sh removes it).
pub const TEST_LABEL: (&str, &str) = ("tether.test", "1");
/// Label naming the benchmark run, for a cleanup that spares everything else.
pub const RUN_LABEL: &str = "tether.bench.run";

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A tar archive of one file `name` of `size` zero bytes, generated on the
/// fly in 64 KiB chunks: header, data, padding, end-of-archive blocks.
pub fn tar_chunks(name: &str, size: u64) -> impl Iterator<Item = Bytes> + Send + 'static {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).expect("a short relative path");
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let header = Bytes::copy_from_slice(h.as_bytes());
    // Data padded to a 512-byte boundary, then two zero blocks.
    let tail = size.div_ceil(512) * 512 - size + 1024;
    let zeros = size + tail;
    let chunk = ZEROS.len() as u64;
    let full = zeros / chunk;
    let rest = (zeros % chunk) as usize;
    std::iter::once(header)
        .chain((0..full).map(|_| Bytes::from_static(&ZEROS)))
        .chain((rest > 0).then(|| Bytes::from_static(&ZEROS[..rest])))
}

/// Outcome of one exec.
pub struct Ran {
    pub exit: i64,
    pub bytes: u64,
}

async fn create_exec(d: &Docker, container: &str, cmd: &[String]) -> anyhow::Result<String> {
    Ok(d.create_exec(
        container,
        CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(cmd.to_vec()),
            ..Default::default()
        },
    )
    .await
    .context("create exec")?
    .id)
}

type Output = std::pin::Pin<
    Box<dyn Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>> + Send>,
>;

async fn start_exec(d: &Docker, id: &str) -> anyhow::Result<Output> {
    match d
        .start_exec(
            id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: Some(64 * 1024),
            }),
        )
        .await
        .context("start exec")?
    {
        StartExecResults::Attached { output, .. } => Ok(output),
        StartExecResults::Detached => bail!("exec started detached"),
    }
}

/// Runs `cmd` in `container` to completion, as a careful direct client
/// would: create, start attached, drain the output, read the exit code.
pub async fn exec(d: &Docker, container: &str, cmd: &[String]) -> anyhow::Result<Ran> {
    let id = create_exec(d, container, cmd).await?;
    let mut output = start_exec(d, &id).await?;
    let mut bytes = 0u64;
    while let Some(item) = output.next().await {
        bytes += item.context("read exec output")?.into_bytes().len() as u64;
    }
    Ok(Ran {
        exit: exit_code(d, &id).await?,
        bytes,
    })
}

/// Starts `cmd` attached and returns its output unread (a stalled reader).
pub async fn exec_unread(d: &Docker, container: &str, cmd: &[String]) -> anyhow::Result<Output> {
    let id = create_exec(d, container, cmd).await?;
    start_exec(d, &id).await
}

/// Execs whose exit code was read, and how many of them still showed as
/// running at the first look (the engine ends the output stream a moment
/// before it records the exit).
pub static EXITS: AtomicU64 = AtomicU64::new(0);
pub static EXITS_LATE: AtomicU64 = AtomicU64::new(0);

/// The exit code, polled every millisecond until the engine has it.
async fn exit_code(d: &Docker, id: &str) -> anyhow::Result<i64> {
    EXITS.fetch_add(1, Ordering::Relaxed);
    for attempt in 0..5000 {
        let i = d.inspect_exec(id).await.context("inspect exec")?;
        if i.running != Some(true)
            && let Some(code) = i.exit_code
        {
            return Ok(code);
        }
        if attempt == 0 {
            EXITS_LATE.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    bail!("exec {id} reports no exit code")
}

/// Extracts a generated archive of `size` zero bytes as `dir/name`.
pub async fn upload(
    d: &Docker,
    container: &str,
    dir: &str,
    name: &str,
    size: u64,
) -> anyhow::Result<()> {
    let body = futures_util::stream::iter(tar_chunks(name, size));
    d.upload_to_container(
        container,
        Some(UploadToContainerOptions {
            path: dir.into(),
            ..Default::default()
        }),
        bollard::body_stream(body),
    )
    .await
    .context("upload archive")
}

/// Downloads `path` as a tar stream; returns its length.
pub async fn download(d: &Docker, container: &str, path: &str) -> anyhow::Result<u64> {
    let mut s = d.download_from_container(
        container,
        Some(DownloadFromContainerOptions { path: path.into() }),
    );
    let mut n = 0u64;
    while let Some(b) = s.next().await {
        n += b.context("download archive")?.len() as u64;
    }
    Ok(n)
}

fn labels(run: &str) -> HashMap<String, String> {
    HashMap::from([
        (TEST_LABEL.0.to_string(), TEST_LABEL.1.to_string()),
        (RUN_LABEL.to_string(), run.to_string()),
    ])
}

/// What tether's agent creates for a worker, made directly: a bridge
/// network on its own /28 (no inter-container traffic), then a hardened
/// container on it, started. Same limits as the agent's defaults.
pub async fn spawn(
    d: &Docker,
    run: &str,
    name: &str,
    subnet: &str,
    gateway: &str,
    image: &str,
) -> anyhow::Result<()> {
    d.create_network(NetworkCreateRequest {
        name: name.into(),
        driver: Some("bridge".into()),
        internal: Some(false),
        attachable: Some(false),
        ipam: Some(Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.into()),
                gateway: Some(gateway.into()),
                ..Default::default()
            }]),
            options: None,
        }),
        labels: Some(labels(run)),
        options: Some(HashMap::from([(
            "com.docker.network.bridge.enable_icc".to_string(),
            "false".to_string(),
        )])),
        ..Default::default()
    })
    .await
    .context("create network")?;
    let memory = 512 * 1024 * 1024;
    d.create_container(
        Some(CreateContainerOptions {
            name: Some(name.into()),
            ..Default::default()
        }),
        ContainerCreateBody {
            image: Some(image.into()),
            cmd: Some(vec!["sleep".into(), "3600".into()]),
            labels: Some(labels(run)),
            host_config: Some(HostConfig {
                network_mode: Some(name.into()),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                memory: Some(memory),
                memory_swap: Some(memory),
                nano_cpus: Some(1_000_000_000),
                pids_limit: Some(512),
                init: Some(true),
                publish_all_ports: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .context("create container")?;
    d.start_container(name, None)
        .await
        .context("start container")?;
    Ok(())
}

/// Removes a container (forced) and a network of the same name.
pub async fn remove(d: &Docker, name: &str) {
    let _ = d
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                link: false,
            }),
        )
        .await;
    let _ = d.remove_network(name).await;
}

/// Removes every container, then every network, carrying `label` (k=v).
/// Returns how many objects went.
pub async fn remove_labelled(d: &Docker, label: &str) -> usize {
    let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
    let mut n = 0;
    if let Ok(list) = d
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters.clone()),
            ..Default::default()
        }))
        .await
    {
        for c in list {
            if let Some(id) = c.id
                && d.remove_container(
                    &id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        link: false,
                    }),
                )
                .await
                .is_ok()
            {
                n += 1;
            }
        }
    }
    if let Ok(list) = d
        .list_networks(Some(ListNetworksOptions {
            filters: Some(filters),
        }))
        .await
    {
        for net in list {
            if let Some(id) = net.id
                && d.remove_network(&id).await.is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_stream_is_a_valid_archive() {
        let data: Vec<u8> = tar_chunks("dir/f.bin", 70_000)
            .flat_map(|b| b.to_vec())
            .collect();
        assert_eq!(data.len() % 512, 0);
        let mut a = tar::Archive::new(&data[..]);
        let mut entries = a.entries().unwrap();
        let e = entries.next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some("dir/f.bin"));
        assert_eq!(e.size(), 70_000);
        assert!(entries.next().is_none());
    }
}
