//! Hostile and ordinary archives against the extractor.
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

    fn extract_as(&self, entries: &[Vec<u8>], rename: Option<&str>) -> Result<u64, ExtractError> {
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
fn a_directory_that_was_there_keeps_its_mode() {
    let s = Scene::new();
    let mine = s.dst().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::set_permissions(&mine, PermissionsExt::from_mode(0o750)).unwrap();
    s.extract(&[
        raw(EntryType::Directory, b"mine/", b"", 0o777, b""),
        file("mine/f", b"x"),
    ])
    .unwrap();
    assert_eq!(std::fs::read(mine.join("f")).unwrap(), b"x");
    let mode = std::fs::metadata(&mine).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o750, "not made world-writable");
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
