//! Unpacks a `ctl cp` download under one local directory. The tar stream
//! comes from a worker's files through Docker's archiver and the server, and
//! none of them is trusted here: every entry is treated as hostile.
//!
//! The destination directory is opened once. Each entry's parent is then
//! opened relative to that descriptor with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, and the entry itself is
//! made with `*at` calls that never follow a symlink at the last component
//! (`O_CREAT | O_EXCL | O_NOFOLLOW`, `mkdirat`, `symlinkat`, `linkat`
//! without `AT_SYMLINK_FOLLOW`). So nothing is ever written outside the
//! destination and no symlink on this machine is followed.
//!
//! Symlink entries are made as symlinks, as `docker cp` does; a later entry
//! through one is refused. Also refused: absolute names, `..`, a name given
//! twice, a hard link to anything but an earlier file of the same archive,
//! devices and fifos, and a directory where a non-directory already is (or
//! the reverse). The first refusal ends the copy with an error naming the
//! entry; what was unpacked before it stays, inside the destination.
//! Modes keep the permission bits only: setuid, setgid and sticky are
//! dropped. Directory modes and times are applied at the end, so a
//! read-only directory can still be filled.

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use tar::EntryType;

/// Why an archive entry is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("absolute name")]
    Absolute,
    #[error("name with `..`")]
    DotDot,
    #[error("empty name")]
    Empty,
    #[error("its path goes through a symbolic link")]
    ThroughSymlink,
    #[error("named twice in the archive")]
    Duplicate,
    #[error("hard link to something other than an earlier file of the archive")]
    LinkTarget,
    #[error("device node")]
    Device,
    #[error("fifo")]
    Fifo,
    #[error("a directory of that name exists")]
    ReplacesDirectory,
    #[error("a non-directory of that name exists")]
    NotADirectory,
}

/// A failed extraction.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("refusing archive entry {entry:?}: {reason}")]
    Refused { entry: String, reason: Refusal },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the archive: {0}")]
    Read(#[source] io::Error),
}

/// Unpacks `archive` beneath the directory `dir`, streaming; returns the
/// bytes of file data written. With `rename`, the first component of every
/// entry is replaced by it (docker cp onto a path that is not a directory).
pub fn extract(
    archive: impl Read,
    dir: &Path,
    rename: Option<&OsStr>,
) -> Result<u64, ExtractError> {
    let write = |source: io::Error| ExtractError::Write {
        path: dir.to_path_buf(),
        source,
    };
    // The destination itself is the operator's choice: a symlink there is
    // followed, once, here.
    let root = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| write(e.into()))?;
    let mut x = Extractor {
        root,
        dir,
        rename,
        made: HashMap::new(),
        dirs: Vec::new(),
        parent: None,
        buf: vec![0; 64 * 1024],
    };
    let mut ar = tar::Archive::new(archive);
    let mut total = 0;
    for entry in ar.entries().map_err(ExtractError::Read)? {
        total += x.entry(&mut entry.map_err(ExtractError::Read)?)?;
    }
    x.finish_dirs()?;
    Ok(total)
}

/// What an earlier entry made at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    Dir,
    File,
    Symlink,
}

/// One extraction's state.
struct Extractor<'a> {
    /// The destination directory, opened once: everything is made beneath it.
    root: OwnedFd,
    /// The destination as the operator named it, for error messages.
    dir: &'a Path,
    /// Replaces the first component of every entry's name.
    rename: Option<&'a OsStr>,
    /// Every path made so far: a name seen twice is refused, and a hard
    /// link may only point at a file made here.
    made: HashMap<PathBuf, Made>,
    /// Directories whose mode and mtime are applied at the end, once
    /// nothing more is written into them.
    dirs: Vec<(PathBuf, Mode, Option<u64>)>,
    /// The last parent directory opened: consecutive entries share it.
    parent: Option<(PathBuf, OwnedFd)>,
    /// Copy buffer, reused by every file.
    buf: Vec<u8>,
}

/// Resolution for every path opened beneath the destination.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// How a directory is opened to make entries in it.
const DIR_PATH: OFlags = OFlags::PATH.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

impl Extractor<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<u64, ExtractError> {
        let name = entry.path_bytes().into_owned();
        let refuse = |reason| ExtractError::Refused {
            entry: String::from_utf8_lossy(&name).into_owned(),
            reason,
        };
        let kind = entry.header().entry_type();
        match kind {
            EntryType::XGlobalHeader | EntryType::XHeader => return Ok(0),
            EntryType::GNULongName | EntryType::GNULongLink => return Ok(0),
            EntryType::Char | EntryType::Block => return Err(refuse(Refusal::Device)),
            EntryType::Fifo => return Err(refuse(Refusal::Fifo)),
            _ => {}
        }
        let rel = local_path(&name, self.rename).map_err(refuse)?;
        if self.made.contains_key(&rel) {
            return Err(refuse(Refusal::Duplicate));
        }
        let (parent_rel, file_name) = split(&rel);
        let write = |source: Errno| ExtractError::Write {
            path: self.dir.join(&rel),
            source: source.into(),
        };
        let parent = match cached_dir(&mut self.parent, &self.root, parent_rel) {
            Ok(p) => p,
            Err(Errno::LOOP | Errno::XDEV) => return Err(refuse(Refusal::ThroughSymlink)),
            Err(e) => return Err(write(e)),
        };
        let mode = Mode::from_raw_mode(entry.header().mode().map_err(ExtractError::Read)? & 0o777);
        let mtime = entry.header().mtime().ok();
        // Old-style headers mark a directory by a trailing slash only.
        let is_dir =
            kind == EntryType::Directory || (kind == EntryType::Regular && name.ends_with(b"/"));
        let mut total = 0;
        let made = if is_dir {
            match rustix::fs::mkdirat(parent, file_name, mode | Mode::RWXU) {
                // Made here: it gets the archive's mode and time at the end.
                Ok(()) => self.dirs.push((rel.clone(), mode, mtime)),
                // There already (the destination's own, or a parent made
                // on the way): it keeps its mode, so a worker's archive
                // cannot make the operator's directories world-writable.
                Err(Errno::EXIST) => {
                    let st = rustix::fs::statat(parent, file_name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(write)?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                        return Err(refuse(Refusal::NotADirectory));
                    }
                }
                Err(e) => return Err(write(e)),
            }
            Made::Dir
        } else if kind == EntryType::Symlink {
            let target = entry.link_name_bytes().unwrap_or_default();
            replace(parent, file_name).map_err(|e| e.into_error(&refuse, &write))?;
            rustix::fs::symlinkat(OsStr::from_bytes(&target), parent, file_name).map_err(write)?;
            Made::Symlink
        } else if kind == EntryType::Link {
            let target = entry.link_name_bytes().unwrap_or_default();
            let target =
                local_path(&target, self.rename).map_err(|_| refuse(Refusal::LinkTarget))?;
            if self.made.get(&target) != Some(&Made::File) {
                return Err(refuse(Refusal::LinkTarget));
            }
            let (target_parent, target_name) = split(&target);
            let target_parent = open_dir(&self.root, target_parent, false).map_err(write)?;
            replace(parent, file_name).map_err(|e| e.into_error(&refuse, &write))?;
            rustix::fs::linkat(
                &target_parent,
                target_name,
                parent,
                file_name,
                AtFlags::empty(),
            )
            .map_err(write)?;
            Made::File
        } else {
            // Regular, contiguous, sparse, and (as POSIX asks) any type
            // not known: a regular file.
            replace(parent, file_name).map_err(|e| e.into_error(&refuse, &write))?;
            let fd = rustix::fs::openat(
                parent,
                file_name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::RUSR | Mode::WUSR,
            )
            .map_err(write)?;
            let mut file = File::from(fd);
            let io_write = |source: io::Error| ExtractError::Write {
                path: self.dir.join(&rel),
                source,
            };
            loop {
                let n = match entry.read(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ExtractError::Read(e)),
                };
                file.write_all(&self.buf[..n]).map_err(io_write)?;
                total += n as u64;
            }
            rustix::fs::fchmod(&file, mode).map_err(write)?;
            if let Some(t) = mtime {
                rustix::fs::futimens(&file, &times(t)).map_err(write)?;
            }
            Made::File
        };
        self.made.insert(rel, made);
        Ok(total)
    }

    /// Applies the directories' modes and times, deepest first so that a
    /// directory closed to its owner does not stop its children's turn.
    fn finish_dirs(&mut self) -> Result<(), ExtractError> {
        for (rel, mode, mtime) in self.dirs.iter().rev() {
            let write = |source: Errno| ExtractError::Write {
                path: self.dir.join(rel),
                source: source.into(),
            };
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
            let fd = open_beneath(self.root.as_fd(), rel, flags).map_err(write)?;
            rustix::fs::fchmod(&fd, *mode).map_err(write)?;
            if let Some(t) = mtime {
                rustix::fs::futimens(&fd, &times(*t)).map_err(write)?;
            }
        }
        Ok(())
    }
}

/// Maps an archive name to its path beneath the destination: relative,
/// only normal components, the first replaced by `rename`.
fn local_path(name: &[u8], rename: Option<&OsStr>) -> Result<PathBuf, Refusal> {
    if name.starts_with(b"/") {
        return Err(Refusal::Absolute);
    }
    let mut out = PathBuf::new();
    let parts = name
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".");
    for (i, part) in parts.enumerate() {
        if part == b".." {
            return Err(Refusal::DotDot);
        }
        match rename {
            Some(r) if i == 0 => out.push(r),
            _ => out.push(OsStr::from_bytes(part)),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(Refusal::Empty);
    }
    Ok(out)
}

/// Splits a path made by [`local_path`] into its parent (maybe empty) and
/// its last component.
fn split(rel: &Path) -> (&Path, &OsStr) {
    let parent = rel.parent().unwrap_or(Path::new(""));
    let name = rel
        .file_name()
        .expect("local_path ends with a normal component");
    (parent, name)
}

/// The parent directory `rel`, reusing the last one opened.
fn cached_dir<'c>(
    cache: &'c mut Option<(PathBuf, OwnedFd)>,
    root: &OwnedFd,
    rel: &Path,
) -> Result<BorrowedFd<'c>, Errno> {
    if !matches!(cache, Some((p, _)) if p == rel) {
        *cache = Some((rel.to_path_buf(), open_dir(root, rel, true)?));
    }
    Ok(cache.as_ref().expect("just filled").1.as_fd())
}

/// Opens the directory `rel` beneath `root`, never through a symlink; with
/// `create`, directories missing on the way are made (mode 0777 less the
/// umask, as `mkdir -p` does).
fn open_dir(root: &OwnedFd, rel: &Path, create: bool) -> Result<OwnedFd, Errno> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    match open_beneath(root.as_fd(), rel, DIR_PATH) {
        Err(Errno::NOENT) if create => {}
        r => return r,
    }
    let mut cur = open_beneath(root.as_fd(), Path::new("."), DIR_PATH)?;
    for c in rel.components() {
        match rustix::fs::mkdirat(&cur, c.as_os_str(), Mode::from_raw_mode(0o777)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e),
        }
        cur = open_beneath(cur.as_fd(), Path::new(c.as_os_str()), DIR_PATH)?;
    }
    Ok(cur)
}

/// `openat2` beneath `dir` with no symlink anywhere in `rel`. Kernels
/// before 5.6, and seccomp profiles that predate it, lack `openat2`: then
/// the same rule is applied one component at a time.
fn open_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    for _ in 0..16 {
        match rustix::fs::openat2(dir, rel, flags, Mode::empty(), BENEATH) {
            // A rename elsewhere raced the lookup: try again.
            Err(Errno::AGAIN) => continue,
            Err(Errno::NOSYS | Errno::PERM) => break,
            r => return r,
        }
    }
    open_walking(dir, rel, flags)
}

/// [`open_beneath`] without `openat2`: each component opened with
/// `O_NOFOLLOW | O_DIRECTORY`; only normal components are accepted.
fn open_walking(dir: BorrowedFd<'_>, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let nofollow = OFlags::NOFOLLOW | OFlags::DIRECTORY | OFlags::CLOEXEC;
    if rel == Path::new(".") {
        return rustix::fs::openat(dir, ".", flags | nofollow, Mode::empty());
    }
    let mut cur: Option<OwnedFd> = None;
    let mut comps = rel.components().peekable();
    while let Some(c) = comps.next() {
        let Component::Normal(name) = c else {
            return Err(Errno::XDEV);
        };
        let base = cur.as_ref().map_or(dir, |f| f.as_fd());
        let step = if comps.peek().is_some() {
            DIR_PATH
        } else {
            flags
        };
        match rustix::fs::openat(base, name, step | nofollow, Mode::empty()) {
            Ok(fd) => cur = Some(fd),
            // O_DIRECTORY reports a symlink as "not a directory".
            Err(Errno::NOTDIR) => {
                let st = rustix::fs::statat(base, name, AtFlags::SYMLINK_NOFOLLOW)?;
                return Err(match FileType::from_raw_mode(st.st_mode) {
                    FileType::Symlink => Errno::LOOP,
                    _ => Errno::NOTDIR,
                });
            }
            Err(e) => return Err(e),
        }
    }
    cur.ok_or(Errno::INVAL)
}

/// Why [`replace`] failed.
enum ReplaceError {
    Refused(Refusal),
    Io(Errno),
}

impl ReplaceError {
    fn into_error(
        self,
        refuse: &impl Fn(Refusal) -> ExtractError,
        write: &impl Fn(Errno) -> ExtractError,
    ) -> ExtractError {
        match self {
            ReplaceError::Refused(r) => refuse(r),
            ReplaceError::Io(e) => write(e),
        }
    }
}

/// Clears the way for a non-directory named `name` in `parent`: what the
/// destination held there before (not an entry of this archive: those are
/// refused as duplicates) is unlinked, never followed; a directory stays
/// and the entry is refused.
fn replace(parent: BorrowedFd<'_>, name: &OsStr) -> Result<(), ReplaceError> {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            Err(ReplaceError::Refused(Refusal::ReplacesDirectory))
        }
        Ok(_) => rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(ReplaceError::Io),
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(ReplaceError::Io(e)),
    }
}

/// Access and modification time both set to the archive's mtime, as `tar`
/// does (0 becomes 1: some tools read 0 as "unset").
fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime.clamp(1, i64::MAX as u64) as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

#[cfg(test)]
mod tests;
