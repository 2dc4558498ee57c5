//! Host paths mounted into workers, resolved on the node before Docker sees
//! them. Docker follows symbolic links in a bind source, and a worker that
//! can write under an allowed path can plant one (`ln -s / /data/esc`), so a
//! source is accepted only if every component below its (outermost) allowed
//! root is a directory, and the last a directory or regular file, opened
//! one at a time without following links
//! (`openat` with `O_NOFOLLOW`, as `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`
//! would). Docker gets the path that was checked.
//!
//! Between that check and the engine's mount a worker that can write to a
//! directory above the source could still swap it for a link. The rule that
//! closes the race: a source strictly inside a directory that a running
//! worker of this node mounts read-write is refused while that worker runs.
//! Checks and starts of workers with mounts are serialised ([`MOUNT_LOCK`]).
//!
//! Some host paths are never mounted, however wide `allowed_host_paths` is:
//! the agent's state directory (its token and key), the Docker socket (root
//! on the host) and Docker's data directory (every container's files and
//! volumes). A source that holds one of them, or lies inside one, is
//! refused ([`Protected`]).

use crate::docker::containers::BindMount;
use crate::protocol::{ErrorBody, ErrorCode, Mount};
use rustix::fs::{FileType, Mode, OFlags};
use std::path::{Component, Path, PathBuf};

/// Held from a spawn's mount checks until its container has started.
pub static MOUNT_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Container paths no host path may be mounted over (or under).
const FORBIDDEN_TARGETS: &[&str] = &["/proc", "/sys", "/dev"];

fn denied(rule: &str, what: String) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::PolicyDenied,
        format!("denied by node policy `{rule}`: {what}"),
    )
}

/// Checks a mount's target: absolute, plain, not `/`, and not over `/proc`,
/// `/sys` or `/dev` (where a host path could shadow the kernel's view).
pub fn check_target(target: &str) -> Result<(), ErrorBody> {
    let p = Path::new(target);
    let plain = p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain || p.components().count() < 2 {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("mount target {target:?} must be an absolute path below / without . or .."),
        ));
    }
    if let Some(f) = FORBIDDEN_TARGETS.iter().find(|f| p.starts_with(f)) {
        return Err(denied(
            "sandbox.mounts",
            format!("mount target {target:?} lies in {f}"),
        ));
    }
    Ok(())
}

/// Resolves `source` below one of `allowed` without following any link;
/// returns the path Docker is to mount (the allowed root's canonical path
/// joined with the checked remainder).
pub fn resolve_source(source: &str, allowed: &[String]) -> Result<PathBuf, ErrorBody> {
    let src = Path::new(source);
    let not_allowed = || {
        denied(
            "sandbox.mounts.allowed_host_paths",
            format!("host path {source:?} is not under an allowed path"),
        )
    };
    if !src.is_absolute()
        || !src
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Err(not_allowed());
    }
    // The shortest allowed root that contains the source: with nested
    // roots (`/srv`, `/srv/data`), a worker that can write `/srv` could
    // make `/srv/data` a link, so the walk starts above it.
    let root = allowed
        .iter()
        .map(Path::new)
        .filter(|a| a.is_absolute() && src.starts_with(a))
        .min_by_key(|a| a.components().count())
        .ok_or_else(not_allowed)?;
    let rest = src.strip_prefix(root).expect("starts_with checked");
    // The root is the node operator's own setting: links in it are theirs.
    let root = std::fs::canonicalize(root).map_err(|e| {
        denied(
            "sandbox.mounts.allowed_host_paths",
            format!(
                "allowed path {} cannot be opened on the node: {e} (an agent in a container sees host paths only where they are mounted at the same path)",
                root.display()
            ),
        )
    })?;
    let mut fd = rustix::fs::open(
        &root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        denied(
            "sandbox.mounts.allowed_host_paths",
            format!("{}: {e}", root.display()),
        )
    })?;
    let mut walked = root.clone();
    let depth = rest.components().count();
    for (i, c) in rest.components().enumerate() {
        let Component::Normal(name) = c else {
            return Err(not_allowed());
        };
        walked.push(name);
        let next = rustix::fs::openat(
            &fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            denied(
                "sandbox.mounts.allowed_host_paths",
                format!("host path {source:?}: {}: {e}", walked.display()),
            )
        })?;
        let st = rustix::fs::fstat(&next).map_err(|e| {
            denied(
                "sandbox.mounts.allowed_host_paths",
                format!("host path {source:?}: {e}"),
            )
        })?;
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind == FileType::Symlink {
            return Err(denied(
                "sandbox.mounts.allowed_host_paths",
                format!(
                    "host path {source:?} goes through a symbolic link at {}: links are never followed",
                    walked.display()
                ),
            ));
        }
        let last = i + 1 == depth;
        let plain = kind == FileType::Directory || (last && kind == FileType::RegularFile);
        if !plain {
            return Err(denied(
                "sandbox.mounts.allowed_host_paths",
                format!(
                    "host path {source:?}: {} is not a directory or regular file",
                    walked.display()
                ),
            ));
        }
        fd = next;
    }
    Ok(walked)
}

/// Host paths no mount may hold or lie in, each with what it is.
#[derive(Debug, Clone, Default)]
pub struct Protected(Vec<(PathBuf, &'static str)>);

impl Protected {
    /// The agent's state directory, the Docker socket and Docker's data
    /// directory, as this process sees them and, when it runs in a
    /// container, as the host does (through `own_mounts`, its container's
    /// binds as (host source, destination)).
    pub fn new(
        state_dir: &Path,
        socket: &Path,
        docker_root: &Path,
        own_mounts: &[(PathBuf, PathBuf)],
    ) -> Protected {
        let mut paths = Vec::new();
        for (p, what) in [
            (state_dir, "the agent's state directory"),
            (socket, "the Docker socket"),
            (docker_root, "Docker's data directory"),
        ] {
            let seen = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            for (src, dst) in own_mounts {
                if let Ok(rest) = seen.strip_prefix(dst) {
                    paths.push((src.join(rest), what));
                }
            }
            paths.push((seen, what));
        }
        Protected(paths)
    }

    /// What `source` (resolved) holds or lies in, if it is protected.
    fn touches(&self, source: &Path) -> Option<(&Path, &'static str)> {
        self.0
            .iter()
            .find(|(p, _)| source.starts_with(p) || p.starts_with(source))
            .map(|(p, what)| (p.as_path(), *what))
    }
}

/// The socket `DOCKER_HOST` or the agent's setting names (the default one
/// otherwise).
pub fn docker_socket(configured: Option<&str>) -> PathBuf {
    let from_env = std::env::var("DOCKER_HOST").ok();
    let unix = configured
        .map(str::to_string)
        .or_else(|| from_env.and_then(|h| h.strip_prefix("unix://").map(str::to_string)));
    PathBuf::from(unix.unwrap_or_else(|| "/var/run/docker.sock".into()))
}

/// Checks and resolves every mount of a spawn in place. `existing` are the
/// host paths that workers of this node, running or stopped, mount.
///
/// A path inside a directory that a worker can write can be swapped for a
/// link to anywhere (the Docker socket, `/`) before the engine mounts it
/// again, which it does at every start, a restart policy's included. So
/// no mount may lie inside a read-write one, whichever comes first: an
/// existing worker's, another worker's to come, or one of this same spawn.
pub fn resolve_all(
    mounts: &mut [Mount],
    allowed: &[String],
    existing: &[BindMount],
    protected: &Protected,
) -> Result<(), ErrorBody> {
    let mut asked = Vec::with_capacity(mounts.len());
    for m in mounts.iter() {
        check_target(&m.target)?;
        let resolved = resolve_source(&m.source, allowed)?;
        if let Some((p, what)) = protected.touches(&resolved) {
            let how = if resolved.starts_with(p) {
                "lies in"
            } else {
                "holds"
            };
            return Err(denied(
                "sandbox.mounts.allowed_host_paths",
                format!(
                    "host path {:?} {how} {what} ({}), which no worker may mount",
                    m.source,
                    p.display()
                ),
            ));
        }
        asked.push(BindMount {
            source: resolved,
            // The policy has settled every mount's mode by now; unsettled
            // ones are mounted read-only.
            writable: m.read_only == Some(false),
        });
    }
    for (i, (m, mine)) in mounts.iter().zip(&asked).enumerate() {
        let others = asked
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, o)| (o, "this spawn also mounts"))
            .chain(existing.iter().map(|o| (o, "a worker of this node mounts")));
        for (other, whose) in others {
            if other.writable && inside(&mine.source, &other.source) {
                return Err(denied(
                    "sandbox.mounts.allowed_host_paths",
                    format!(
                        "host path {:?} lies inside {}, which {whose} read-write (the path could be replaced with a link before it is mounted)",
                        m.source,
                        other.source.display()
                    ),
                ));
            }
            if mine.writable && inside(&other.source, &mine.source) {
                return Err(denied(
                    "sandbox.mounts.allowed_host_paths",
                    format!(
                        "host path {:?} holds {}, which {whose}: read-write, it could replace that path with a link before it is mounted again (mount it read-only)",
                        m.source,
                        other.source.display()
                    ),
                ));
            }
        }
    }
    for (m, resolved) in mounts.iter_mut().zip(asked) {
        m.source = resolved.source.to_string_lossy().into_owned();
    }
    Ok(())
}

/// `path` lies strictly inside `dir`.
fn inside(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir) && path != dir
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(source: &Path, target: &str) -> Mount {
        Mount {
            source: source.to_string_lossy().into_owned(),
            target: target.into(),
            read_only: None,
        }
    }

    #[test]
    fn links_anywhere_below_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("allowed");
        std::fs::create_dir_all(root.join("real/sub")).unwrap();
        std::os::unix::fs::symlink("/", root.join("esc")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("alias")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("real/file")).unwrap();
        let allowed = vec![root.to_string_lossy().into_owned()];
        let ok = resolve_source(&root.join("real/sub").to_string_lossy(), &allowed).unwrap();
        assert_eq!(ok, std::fs::canonicalize(root.join("real/sub")).unwrap());
        for bad in ["esc", "esc/etc", "alias/sub", "real/file"] {
            let e = resolve_source(&root.join(bad).to_string_lossy(), &allowed).unwrap_err();
            assert_eq!(e.code, ErrorCode::PolicyDenied, "{bad}: {e}");
            assert!(e.message.contains("symbolic link"), "{bad}: {e}");
        }
        let e = resolve_source(&root.join("missing").to_string_lossy(), &allowed).unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        for bad in ["/etc", "relative/path", "/x/../etc"] {
            assert!(resolve_source(bad, &allowed).is_err(), "{bad}");
        }
        // Nested roots: a link planted at the inner root is still refused.
        std::fs::create_dir_all(root.join("real/inner")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("inner")).unwrap();
        let nested = vec![
            root.join("inner").to_string_lossy().into_owned(),
            root.to_string_lossy().into_owned(),
        ];
        let e = resolve_source(&root.join("inner").to_string_lossy(), &nested).unwrap_err();
        assert!(e.message.contains("symbolic link"), "{e}");
        // Only directories and regular files: no fifos or sockets.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("real/fifo"),
            FileType::Fifo,
            Mode::RUSR | Mode::WUSR,
            0,
        )
        .unwrap();
        let e = resolve_source(&root.join("real/fifo").to_string_lossy(), &allowed).unwrap_err();
        assert!(e.message.contains("not a directory or regular file"), "{e}");
        // A sibling whose name merely starts like the root is outside it.
        let sibling = dir.path().join("allowed-not");
        std::fs::create_dir_all(&sibling).unwrap();
        assert!(resolve_source(&sibling.to_string_lossy(), &allowed).is_err());
    }

    #[test]
    fn targets_and_writable_parents() {
        for bad in [
            "/proc",
            "/proc/x",
            "/sys/fs",
            "/dev",
            "/",
            "rel",
            "/a/../proc",
        ] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
        check_target("/data").unwrap();
        check_target("/devices").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let allowed = vec![root.to_string_lossy().into_owned()];
        // Inside a directory a worker can write: refused; the same
        // directory, or a sibling, is fine.
        let bind = |p: &str, writable| BindMount {
            source: root.join(p),
            writable,
        };
        let existing = vec![bind("a", true)];
        let none = Protected::default();
        let mut m = vec![mount(&root.join("a/b"), "/d")];
        let e = resolve_all(&mut m, &allowed, &existing, &none).unwrap_err();
        assert!(e.message.contains("read-write"), "{e}");
        let mut m = vec![mount(&root.join("a"), "/d")];
        resolve_all(&mut m, &allowed, &existing, &none).unwrap();
        // Inside one only read: fine.
        let mut m = vec![mount(&root.join("a/b"), "/d")];
        resolve_all(&mut m, &allowed, &[bind("a", false)], &none).unwrap();
        // Read-write around what a worker mounts, even read-only: refused;
        // read-only around it, fine.
        let rw = |p: &str, t: &str| Mount {
            read_only: Some(false),
            ..mount(&root.join(p), t)
        };
        let mut m = vec![rw("a", "/d")];
        let e = resolve_all(&mut m, &allowed, &[bind("a/b", false)], &none).unwrap_err();
        assert!(e.message.contains("holds"), "{e}");
        let mut m = vec![mount(&root.join("a"), "/d")];
        resolve_all(&mut m, &allowed, &[bind("a/b", false)], &none).unwrap();
        // Within one spawn, either order: refused.
        for mut m in [
            vec![rw("a", "/x"), mount(&root.join("a/b"), "/f")],
            vec![mount(&root.join("a/b"), "/f"), rw("a", "/x")],
        ] {
            let e = resolve_all(&mut m, &allowed, &[], &none).unwrap_err();
            assert!(e.message.contains("this spawn also mounts"), "{e}");
        }
        // Two read-only, nested, or the same path twice: fine.
        let mut m = vec![mount(&root.join("a"), "/x"), mount(&root.join("a/b"), "/f")];
        resolve_all(&mut m, &allowed, &[], &none).unwrap();
        let mut m = vec![rw("a", "/x"), rw("a", "/y")];
        resolve_all(&mut m, &allowed, &[], &none).unwrap();
    }

    /// The agent's state, the Docker socket and Docker's data stay out of
    /// every worker, even under an allowed path: the directory that holds
    /// them, they themselves and anything inside them.
    #[test]
    fn the_agents_state_and_the_engine_are_never_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for d in [
            "srv/agent/spool",
            "srv/docker/volumes",
            "srv/run",
            "srv/data",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let allowed = vec![root.to_string_lossy().into_owned()];
        let protected = Protected::new(
            &root.join("srv/agent"),
            &root.join("srv/run/docker.sock"),
            &root.join("srv/docker"),
            &[],
        );
        for (bad, what) in [
            ("srv", "the agent's state directory"),
            ("srv/agent", "the agent's state directory"),
            ("srv/agent/spool", "the agent's state directory"),
            ("srv/run", "the Docker socket"),
            ("srv/docker/volumes", "Docker's data directory"),
        ] {
            let mut m = vec![mount(&root.join(bad), "/d")];
            let e = resolve_all(&mut m, &allowed, &[], &protected).unwrap_err();
            assert_eq!(e.code, ErrorCode::PolicyDenied, "{bad}");
            assert!(e.message.contains(what), "{bad}: {e}");
        }
        let mut m = vec![mount(&root.join("srv/data"), "/d")];
        resolve_all(&mut m, &allowed, &[], &protected).unwrap();

        // An agent in a container: its state directory `/state` is the
        // host's `/var/lib/tether-x`, and that host path is protected too.
        let p = Protected::new(
            Path::new("/state"),
            Path::new("/var/run/docker.sock"),
            Path::new("/var/lib/docker"),
            &[(PathBuf::from("/var/lib/tether-x"), PathBuf::from("/state"))],
        );
        assert!(
            p.touches(Path::new("/var/lib/tether-x/agent.key"))
                .is_some()
        );
        assert!(p.touches(Path::new("/var/lib")).is_some());
        assert!(p.touches(Path::new("/var/lib/other")).is_none());
        assert!(p.touches(Path::new("/srv")).is_none());
    }
}
