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
                Ok(()) => {}
                Err(Errno::EXIST) => {
                    let st = rustix::fs::statat(parent, file_name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(write)?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                        return Err(refuse(Refusal::NotADirectory));
                    }
                }
                Err(e) => return Err(write(e)),
            }
            self.dirs.push((rel.clone(), mode, mtime));
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
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A raw tar header: any name, link name, type and mode, none checked.
    fn raw(kind: EntryType, name: &[u8], link: &[u8], mode: u32, data: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, data).unwrap();
        let mut out = b.into_inner().unwrap();
        // Builder::into_inner wrote the two end blocks: keep only the entry.
        out.truncate(out.len() - 1024);
        out
    }

    fn file(name: &str, data: &[u8]) -> Vec<u8> {
        raw(EntryType::Regular, name.as_bytes(), b"", 0o644, data)
    }

    fn dir(name: &str) -> Vec<u8> {
        raw(EntryType::Directory, name.as_bytes(), b"", 0o755, b"")
    }

    fn symlink(name: &str, target: &str) -> Vec<u8> {
        raw(
            EntryType::Symlink,
            name.as_bytes(),
            target.as_bytes(),
            0o777,
            b"",
        )
    }

    fn hardlink(name: &str, target: &str) -> Vec<u8> {
        raw(
            EntryType::Link,
            name.as_bytes(),
            target.as_bytes(),
            0o644,
            b"",
        )
    }

    /// A destination `dst` and, beside it, `outside` holding one file that
    /// no archive may change.
    struct Scene {
        tmp: tempfile::TempDir,
    }

    impl Scene {
        fn new() -> Scene {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::create_dir(tmp.path().join("dst")).unwrap();
            std::fs::create_dir(tmp.path().join("outside")).unwrap();
            std::fs::write(tmp.path().join("outside/victim"), b"original").unwrap();
            Scene { tmp }
        }

        fn dst(&self) -> PathBuf {
            self.tmp.path().join("dst")
        }

        fn outside(&self) -> String {
            self.tmp
                .path()
                .join("outside")
                .to_str()
                .unwrap()
                .to_string()
        }

        fn extract(&self, entries: &[Vec<u8>]) -> Result<u64, ExtractError> {
            self.extract_as(entries, None)
        }

        fn extract_as(
            &self,
            entries: &[Vec<u8>],
            rename: Option<&str>,
        ) -> Result<u64, ExtractError> {
            let mut ar = entries.concat();
            ar.extend_from_slice(&[0; 1024]);
            extract(&ar[..], &self.dst(), rename.map(OsStr::new))
        }

        /// Nothing beside `dst` changed: `outside` holds exactly its
        /// victim, unchanged, and the temporary directory nothing else.
        fn assert_untouched(&self) {
            let mut top: Vec<_> = std::fs::read_dir(self.tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            top.sort();
            assert_eq!(top, ["dst", "outside"]);
            let inside: Vec<_> = std::fs::read_dir(self.outside())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(inside, ["victim"]);
            let victim = Path::new(&self.outside()).join("victim");
            assert_eq!(std::fs::read(&victim).unwrap(), b"original");
            assert_eq!(
                std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777,
                0o644
            );
        }
    }

    fn refusal(r: Result<u64, ExtractError>) -> Refusal {
        match r {
            Err(ExtractError::Refused { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_ordinary_tree_keeps_names_modes_and_times() {
        let s = Scene::new();
        let total = s
            .extract(&[
                dir("d/"),
                file("d/a.txt", b"alpha\n"),
                raw(EntryType::Regular, b"d/x", b"", 0o750, b"run"),
                dir("d/sub/"),
                file("d/sub/deeper/c", b""),
                symlink("d/rel", "a.txt"),
            ])
            .unwrap();
        assert_eq!(total, 9);
        let d = s.dst().join("d");
        assert_eq!(std::fs::read(d.join("a.txt")).unwrap(), b"alpha\n");
        let x = std::fs::metadata(d.join("x")).unwrap();
        assert_eq!(x.permissions().mode() & 0o7777, 0o750);
        assert_eq!(x.mtime(), 1_600_000_000);
        assert!(d.join("sub/deeper/c").is_file());
        assert_eq!(
            std::fs::read_link(d.join("rel")).unwrap(),
            Path::new("a.txt")
        );
        let dm = std::fs::metadata(&d).unwrap();
        assert_eq!(dm.mtime(), 1_600_000_000);
        assert_eq!(dm.permissions().mode() & 0o7777, 0o755);
        s.assert_untouched();
    }

    #[test]
    fn a_renamed_copy_maps_the_first_component() {
        let s = Scene::new();
        s.extract_as(&[dir("d/"), file("d/a", b"1")], Some("new"))
            .unwrap();
        assert_eq!(std::fs::read(s.dst().join("new/a")).unwrap(), b"1");
        s.extract_as(&[file("in.bin", b"2")], Some("back.bin"))
            .unwrap();
        assert_eq!(std::fs::read(s.dst().join("back.bin")).unwrap(), b"2");
    }

    #[test]
    fn a_read_only_directory_is_still_filled() {
        let s = Scene::new();
        s.extract(&[
            raw(EntryType::Directory, b"ro/", b"", 0o555, b""),
            file("ro/f", b"x"),
        ])
        .unwrap();
        assert_eq!(std::fs::read(s.dst().join("ro/f")).unwrap(), b"x");
        let mode = std::fs::metadata(s.dst().join("ro"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555);
        // Let the tempdir go.
        std::fs::set_permissions(s.dst().join("ro"), PermissionsExt::from_mode(0o755)).unwrap();
    }

    #[test]
    fn an_entry_through_a_symlink_is_refused() {
        let s = Scene::new();
        let r = s.extract(&[
            dir("d/"),
            symlink("d/a", &s.outside()),
            file("d/a/file", b"pwned"),
        ]);
        assert_eq!(refusal(r), Refusal::ThroughSymlink);
        // The symlink itself was made, as docker cp makes it, and not followed.
        let link = s.dst().join("d/a");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new(&s.outside()));
        s.assert_untouched();

        // A directory entry through it, and a deeper file, the same.
        let s = Scene::new();
        let r = s.extract(&[symlink("a", &s.outside()), dir("a/sub/")]);
        assert_eq!(refusal(r), Refusal::ThroughSymlink);
        let s = Scene::new();
        let r = s.extract(&[symlink("a", &s.outside()), file("a/x/y", b"pwned")]);
        assert_eq!(refusal(r), Refusal::ThroughSymlink);
        s.assert_untouched();
    }

    #[test]
    fn symlink_chains_up_the_tree_are_refused() {
        let s = Scene::new();
        let r = s.extract(&[
            symlink("up", ".."),
            symlink("up2", "up/.."),
            file("up/outside/victim", b"pwned"),
        ]);
        assert_eq!(refusal(r), Refusal::ThroughSymlink);
        let r = s.extract(&[file("up2/outside/victim", b"pwned")]);
        assert_eq!(refusal(r), Refusal::ThroughSymlink);
        s.assert_untouched();
    }

    #[test]
    fn dot_dot_and_absolute_names_are_refused() {
        let s = Scene::new();
        let r = s.extract(&[file("../outside/victim", b"pwned")]);
        assert_eq!(refusal(r), Refusal::DotDot);
        let r = s.extract(&[file("d/../../x", b"pwned")]);
        assert_eq!(refusal(r), Refusal::DotDot);
        let abs = format!("{}/abs", s.outside());
        let r = s.extract(&[file(&abs, b"pwned")]);
        assert_eq!(refusal(r), Refusal::Absolute);
        let r = s.extract(&[dir("./")]);
        assert_eq!(refusal(r), Refusal::Empty);
        s.assert_untouched();
    }

    #[test]
    fn hard_links_outside_the_archive_are_refused() {
        let s = Scene::new();
        for target in [
            "/etc/passwd".to_string(),
            format!("{}/victim", s.outside()),
            "../outside/victim".into(),
            "d/../../outside/victim".into(),
        ] {
            let r = s.extract(&[dir("d/"), hardlink("d/h", &target)]);
            assert_eq!(refusal(r), Refusal::LinkTarget, "{target}");
            std::fs::remove_dir_all(s.dst().join("d")).unwrap();
        }
        // A file already in the destination is not the archive's.
        std::fs::write(s.dst().join("mine"), b"mine").unwrap();
        let r = s.extract(&[hardlink("h", "mine")]);
        assert_eq!(refusal(r), Refusal::LinkTarget);
        // Nor is a symlink of the archive.
        let victim = format!("{}/victim", s.outside());
        let r = s.extract(&[symlink("s", &victim), hardlink("h", "s")]);
        assert_eq!(refusal(r), Refusal::LinkTarget);
        // Nor a path through one.
        let r = s.extract(&[symlink("o", &s.outside()), hardlink("h2", "o/victim")]);
        assert_eq!(refusal(r), Refusal::LinkTarget);
        assert_eq!(std::fs::metadata(&victim).unwrap().nlink(), 1);
        s.assert_untouched();
    }

    #[test]
    fn a_hard_link_pair_inside_the_copy_works() {
        let s = Scene::new();
        s.extract(&[dir("d/"), file("d/a", b"hello"), hardlink("d/b", "d/a")])
            .unwrap();
        let a = std::fs::metadata(s.dst().join("d/a")).unwrap();
        let b = std::fs::metadata(s.dst().join("d/b")).unwrap();
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
        assert_eq!(std::fs::read(s.dst().join("d/b")).unwrap(), b"hello");
        // Renamed, the link name is renamed the same way.
        s.extract_as(
            &[dir("d/"), file("d/a", b"hi"), hardlink("d/b", "d/a")],
            Some("r"),
        )
        .unwrap();
        let a = std::fs::metadata(s.dst().join("r/a")).unwrap();
        let b = std::fs::metadata(s.dst().join("r/b")).unwrap();
        assert_eq!(a.ino(), b.ino());
        s.assert_untouched();
    }

    #[test]
    fn duplicate_entries_are_refused() {
        let s = Scene::new();
        let victim = format!("{}/victim", s.outside());
        let r = s.extract(&[file("f", b"1"), symlink("f", &victim)]);
        assert_eq!(refusal(r), Refusal::Duplicate);
        assert_eq!(std::fs::read(s.dst().join("f")).unwrap(), b"1");
        let r = s.extract(&[symlink("g", &victim), file("g", b"pwned")]);
        assert_eq!(refusal(r), Refusal::Duplicate);
        let r = s.extract(&[file("h", b"1"), file("./h", b"2")]);
        assert_eq!(refusal(r), Refusal::Duplicate);
        let r = s.extract(&[dir("d/"), symlink("d", &s.outside()), file("d/x", b"2")]);
        assert_eq!(refusal(r), Refusal::Duplicate);
        s.assert_untouched();
    }

    #[test]
    fn an_existing_symlink_in_the_destination_is_replaced_not_followed() {
        let s = Scene::new();
        let victim = format!("{}/victim", s.outside());
        std::os::unix::fs::symlink(&victim, s.dst().join("f")).unwrap();
        std::os::unix::fs::symlink(s.outside(), s.dst().join("d")).unwrap();
        s.extract(&[file("f", b"new")]).unwrap();
        assert_eq!(std::fs::read(s.dst().join("f")).unwrap(), b"new");
        assert!(!s.dst().join("f").is_symlink());
        let r = s.extract(&[dir("d/")]);
        assert_eq!(refusal(r), Refusal::NotADirectory);
        let r = s.extract(&[file("d/victim", b"pwned")]);
        assert_eq!(refusal(r), Refusal::ThroughSymlink);
        s.assert_untouched();
    }

    #[test]
    fn devices_and_fifos_are_refused() {
        let s = Scene::new();
        let r = s.extract(&[raw(EntryType::Char, b"null", b"", 0o666, b"")]);
        assert_eq!(refusal(r), Refusal::Device);
        let r = s.extract(&[raw(EntryType::Block, b"sda", b"", 0o660, b"")]);
        assert_eq!(refusal(r), Refusal::Device);
        let r = s.extract(&[raw(EntryType::Fifo, b"pipe", b"", 0o644, b"")]);
        assert_eq!(refusal(r), Refusal::Fifo);
        assert_eq!(std::fs::read_dir(s.dst()).unwrap().count(), 0);
        s.assert_untouched();
    }

    #[test]
    fn setuid_setgid_and_sticky_bits_are_dropped() {
        let s = Scene::new();
        s.extract(&[
            raw(EntryType::Directory, b"d/", b"", 0o3775, b""),
            raw(EntryType::Regular, b"d/suid", b"", 0o4755, b"#!"),
            raw(EntryType::Regular, b"d/sgid", b"", 0o2755, b"#!"),
        ])
        .unwrap();
        let mode = |p: &str| {
            std::fs::metadata(s.dst().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("d"), 0o775);
        assert_eq!(mode("d/suid"), 0o755);
        assert_eq!(mode("d/sgid"), 0o755);
    }

    #[test]
    fn the_walking_fallback_refuses_symlinks_too() {
        let s = Scene::new();
        std::fs::create_dir_all(s.dst().join("a/b")).unwrap();
        std::os::unix::fs::symlink(s.outside(), s.dst().join("a/l")).unwrap();
        let root = rustix::fs::open(s.dst(), DIR_PATH, Mode::empty()).unwrap();
        assert!(open_walking(root.as_fd(), Path::new("a/b"), DIR_PATH).is_ok());
        assert!(open_walking(root.as_fd(), Path::new("."), DIR_PATH).is_ok());
        assert_eq!(
            open_walking(root.as_fd(), Path::new("a/l"), DIR_PATH).unwrap_err(),
            Errno::LOOP
        );
        std::fs::create_dir(Path::new(&s.outside()).join("in")).unwrap();
        assert_eq!(
            open_walking(root.as_fd(), Path::new("a/l/in"), DIR_PATH).unwrap_err(),
            Errno::LOOP
        );
        assert_eq!(
            open_walking(root.as_fd(), Path::new("a/../.."), DIR_PATH).unwrap_err(),
            Errno::XDEV
        );
        // And openat2 itself, the same cases.
        assert_eq!(
            open_beneath(root.as_fd(), Path::new("a/l/in"), DIR_PATH).unwrap_err(),
            Errno::LOOP
        );
        assert!(open_beneath(root.as_fd(), Path::new("a/../.."), DIR_PATH).is_err());
    }

    #[test]
    fn local_paths_normalise_and_refuse() {
        let p = |n: &str, r: Option<&str>| local_path(n.as_bytes(), r.map(OsStr::new));
        assert_eq!(p("d/a//./b", None), Ok(PathBuf::from("d/a/b")));
        assert_eq!(p("./d/a", Some("new")), Ok(PathBuf::from("new/a")));
        assert_eq!(p("d/../x", None), Err(Refusal::DotDot));
        assert_eq!(p("..", Some("new")), Err(Refusal::DotDot));
        assert_eq!(p("/etc/passwd", None), Err(Refusal::Absolute));
        assert_eq!(p("./", None), Err(Refusal::Empty));
    }

    proptest::proptest! {
        /// Arbitrary sequences of files, directories, symlinks and hard
        /// links over a few hostile names and targets: whatever is unpacked
        /// or refused, nothing beside the destination changes.
        #[test]
        fn nothing_escapes_whatever_the_entries(
            entries in proptest::collection::vec(
                (0u8..4, proptest::collection::vec(0usize..5, 1..4), 0usize..7, proptest::bool::ANY),
                1..8,
            )
        ) {
            let s = Scene::new();
            let parts = ["a", "b", "..", ".", "outside"];
            let outside = s.outside();
            let victim = format!("{outside}/victim");
            let targets = ["..", "../outside", "/", &outside, &victim, "a", "a/b"];
            let mut archive = Vec::new();
            for (kind, name, target, absolute) in entries {
                let mut name = name.iter().map(|&i| parts[i]).collect::<Vec<_>>().join("/");
                if absolute {
                    name = format!("{outside}/{name}");
                }
                let target = targets[target];
                archive.push(match kind {
                    0 => file(&name, b"pwned"),
                    1 => dir(&name),
                    2 => symlink(&name, target),
                    _ => hardlink(&name, target),
                });
            }
            let _ = s.extract(&archive);
            s.assert_untouched();
        }
    }
}
