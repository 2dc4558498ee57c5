//! Files only their owner may read (node keys, tokens, applied
//! configuration, server state), written whole or not at all: a temporary
//! file, synced, then renamed over the old one.

use std::path::{Path, PathBuf};

/// [`write`] off the async runtime (it syncs to disk).
pub async fn store(path: PathBuf, contents: String) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || write(&path, &contents))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// Writes a secret file readable only by its owner.
pub fn write(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}
