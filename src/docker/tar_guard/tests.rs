use super::*;
use std::io::Read;

/// Runs `archive` through a guard in chunks of `size` bytes.
fn guard(archive: &[u8], size: usize) -> Result<Vec<u8>, Refused> {
    let mut g = TarGuard::new();
    let mut out = Vec::new();
    for c in archive.chunks(size) {
        for piece in g.push(Bytes::copy_from_slice(c))? {
            out.extend_from_slice(&piece);
        }
    }
    g.finish()?;
    Ok(out)
}

/// Every way of cutting the stream gives the same answer.
fn guard_all(archive: &[u8]) -> Result<Vec<u8>, Refused> {
    let first = guard(archive, archive.len().max(1));
    for size in [1, 7, 100, 511, 512, 513, 1000, 4096, 65536] {
        assert_eq!(guard(archive, size), first, "chunks of {size}");
    }
    first
}

fn header(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_path(path).unwrap();
    h.set_mode(mode);
    h.set_size(size);
    h.set_cksum();
    h
}

fn raw(h: &tar::Header) -> Vec<u8> {
    h.as_bytes().to_vec()
}

fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        // The length counts itself: find the fixed point.
        let body = k.len() + v.len() + 3;
        let mut n = body + 1;
        while n != body + n.to_string().len() {
            n = body + n.to_string().len();
        }
        data.extend_from_slice(format!("{n} {k}=").as_bytes());
        data.extend_from_slice(v);
        data.push(b'\n');
    }
    let mut out = raw(&header(
        tar::EntryType::XHeader,
        "pax",
        0o644,
        data.len() as u64,
    ));
    out.extend_from_slice(&data);
    out.resize(BLOCK + padded(data.len() as u64) as usize, 0);
    out
}

fn data(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.resize(padded(bytes.len() as u64) as usize, 0);
    v
}

fn end() -> Vec<u8> {
    vec![0; 2 * BLOCK]
}

/// An ordinary archive passes byte for byte, zero-copy where nothing
/// changes.
#[test]
fn an_ordinary_archive_passes_unchanged() {
    let mut b = tar::Builder::new(Vec::new());
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut h = header(tar::EntryType::Regular, "big", 0o644, big.len() as u64);
    b.append_data(&mut h, "big", &big[..]).unwrap();
    b.append_data(
        &mut header(tar::EntryType::Directory, "d/", 0o755, 0),
        "d/",
        &[][..],
    )
    .unwrap();
    let long = format!("d/{}", "n".repeat(150));
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_size(2);
    b.append_data(&mut h, &long, &b"hi"[..]).unwrap();
    b.append_link(
        &mut header(tar::EntryType::Symlink, "l", 0o777, 0),
        "l",
        "big",
    )
    .unwrap();
    let archive = b.into_inner().unwrap();
    assert_eq!(guard_all(&archive).unwrap(), archive);

    // Large chunks of data are passed on as they came: one piece each.
    let mut g = TarGuard::new();
    let pieces = g.push(Bytes::copy_from_slice(&archive[..65536])).unwrap();
    assert_eq!(pieces.len(), 1);
}

#[test]
fn setuid_and_setgid_bits_are_cleared() {
    let mut archive = raw(&header(tar::EntryType::Regular, "su", 0o4755, 3));
    archive.extend(data(b"abc"));
    archive.extend(raw(&header(
        tar::EntryType::Directory,
        "shared/",
        0o2775,
        0,
    )));
    archive.extend(raw(&header(tar::EntryType::Regular, "plain", 0o1777, 1)));
    archive.extend(data(b"z"));
    archive.extend(end());
    let out = guard_all(&archive).unwrap();
    assert_eq!(out.len(), archive.len());
    let mut a = tar::Archive::new(&out[..]);
    let mut seen = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut body = Vec::new();
        e.read_to_end(&mut body).unwrap();
        seen.push((
            e.path().unwrap().to_string_lossy().into_owned(),
            e.header().mode().unwrap(),
            body,
        ));
    }
    assert_eq!(
        seen,
        vec![
            ("su".into(), 0o755, b"abc".to_vec()),
            ("shared/".into(), 0o775, vec![]),
            ("plain".into(), 0o1777, b"z".to_vec()),
        ]
    );
}

#[test]
fn extended_attributes_other_than_user_ones_are_dropped() {
    let mut archive = pax(&[
        (
            "SCHILY.xattr.security.capability",
            b"\x01\x00\x00\x02\xff\xff\xff\xff",
        ),
        ("SCHILY.xattr.user.note", b"kept"),
        ("SCHILY.xattr.trusted.x", b"gone"),
        ("mtime", b"1700000000"),
    ]);
    archive.extend(raw(&header(tar::EntryType::Regular, "ping", 0o755, 2)));
    archive.extend(data(b"ok"));
    archive.extend(end());
    let out = guard_all(&archive).unwrap();
    let mut a = tar::Archive::new(&out[..]);
    let mut e = a.entries().unwrap().next().unwrap().unwrap();
    let keys: Vec<String> = e
        .pax_extensions()
        .unwrap()
        .unwrap()
        .map(|r| r.unwrap().key().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["SCHILY.xattr.user.note", "mtime"]);
    let mut body = String::new();
    e.read_to_string(&mut body).unwrap();
    assert_eq!(body, "ok");
}

#[test]
fn devices_fifos_and_sparse_files_refuse_the_upload() {
    for (t, what) in [
        (tar::EntryType::Char, "a character device"),
        (tar::EntryType::Block, "a block device"),
        (tar::EntryType::Fifo, "a FIFO"),
        (tar::EntryType::GNUSparse, "a sparse file"),
    ] {
        let mut archive = raw(&header(tar::EntryType::Regular, "ok", 0o644, 0));
        archive.extend(raw(&header(t, "dev/sda", 0o666, 0)));
        archive.extend(end());
        let err = guard_all(&archive).unwrap_err();
        assert!(
            matches!(&err, Refused::Kind { kind, name } if *kind == what && name == "dev/sda"),
            "{err:?}"
        );
    }
    let mut archive = pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")]);
    archive.extend(raw(&header(tar::EntryType::Regular, "s", 0o644, 0)));
    archive.extend(end());
    assert!(matches!(guard_all(&archive), Err(Refused::Kind { .. })));
}

/// A PAX `size` moves where the next header is, for the engine as for the
/// guard: a device hidden where the header's own size says data is found.
#[test]
fn a_pax_size_is_followed_where_the_engine_follows_it() {
    let hidden = raw(&header(tar::EntryType::Block, "disk", 0o666, 0));
    let mut archive = pax(&[("size", b"0")]);
    archive.extend(raw(&header(tar::EntryType::Regular, "f", 0o644, 512)));
    archive.extend(hidden.clone());
    archive.extend(end());
    assert!(matches!(
        guard_all(&archive),
        Err(Refused::Kind {
            kind: "a block device",
            ..
        })
    ));
    // And the other way: a PAX size larger than the header's.
    let mut archive = pax(&[("size", b"512")]);
    archive.extend(raw(&header(tar::EntryType::Regular, "f", 0o644, 0)));
    archive.extend(hidden);
    archive.extend(end());
    assert_eq!(
        guard_all(&archive).unwrap(),
        archive,
        "the device is the file's data"
    );
}

/// Where readers disagree about an entry's length, the upload is refused.
#[test]
fn entries_whose_length_readers_disagree_on_are_refused() {
    // A symbolic link or directory with a size: Go reads no data.
    for t in [
        tar::EntryType::Symlink,
        tar::EntryType::Directory,
        tar::EntryType::Link,
    ] {
        let mut archive = raw(&header(t, "l", 0o777, 512));
        archive.extend(raw(&header(tar::EntryType::Char, "c", 0o666, 0)));
        archive.extend(end());
        assert!(
            matches!(guard_all(&archive), Err(Refused::Malformed(_))),
            "{t:?}"
        );
    }
    // A legacy entry named like a directory, with data.
    let mut h = header(tar::EntryType::Regular, "looks/", 0o644, 512);
    h.as_mut_bytes()[156] = 0;
    h.set_cksum();
    let mut archive = raw(&h);
    archive.extend(data(&[b'x'; 512]));
    archive.extend(end());
    assert!(matches!(guard_all(&archive), Err(Refused::Malformed(_))));
    // A legacy entry with a plain name is a regular file.
    let mut h = header(tar::EntryType::Regular, "file", 0o644, 3);
    h.as_mut_bytes()[156] = 0;
    h.set_cksum();
    let mut archive = raw(&h);
    archive.extend(data(b"abc"));
    archive.extend(end());
    assert_eq!(guard_all(&archive).unwrap(), archive);
    // A global header with an extended one pending.
    let mut archive = pax(&[("size", b"0")]);
    archive.extend(raw(&header(tar::EntryType::XGlobalHeader, "g", 0o644, 0)));
    archive.extend(end());
    assert!(matches!(guard_all(&archive), Err(Refused::Malformed(_))));
}

/// A gzip header's extra field can carry a harmless archive in front of
/// the compressed one Docker would extract: compressed starts are refused.
#[test]
fn compressed_streams_are_refused() {
    let mut h = header(tar::EntryType::Regular, "x", 0o644, 0);
    // `1f 8b 08 04` (gzip, FEXTRA) as the start of the first name.
    h.as_mut_bytes()[..4].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04]);
    h.set_cksum();
    let mut archive = raw(&h);
    archive.extend(end());
    let err = guard(&archive, 1).unwrap_err();
    assert!(err.to_string().contains("gzip"), "{err}");
    // A name that merely begins like a signature, cut byte by byte.
    let mut archive = raw(&header(tar::EntryType::Regular, "BZ", 0o644, 0));
    archive.extend(end());
    assert_eq!(guard(&archive, 1).unwrap(), archive);
    for start in [
        &b"BZh91AY"[..],
        &[0xfd, b'7', b'z', b'X', b'Z', 0, 0][..],
        &[0x28, 0xb5, 0x2f, 0xfd][..],
        &[0x5e, 0x2a, 0x4d, 0x18][..],
    ] {
        let mut a = start.to_vec();
        a.resize(1024, 0);
        assert!(guard(&a, 1024).is_err(), "{start:?}");
    }
}

#[test]
fn broken_and_truncated_archives_are_refused_and_trailing_bytes_dropped() {
    let mut h = raw(&header(tar::EntryType::Regular, "f", 0o644, 3));
    h[130] ^= 1;
    assert!(matches!(guard(&h, 512), Err(Refused::Malformed(m)) if m.contains("checksum")));

    let mut archive = raw(&header(tar::EntryType::Regular, "f", 0o644, 1000));
    archive.extend(vec![1; 600]);
    assert!(
        matches!(guard(&archive, 100), Err(Refused::Malformed(m)) if m.contains("ends inside"))
    );

    // After the end, nothing more reaches the engine.
    let mut archive = raw(&header(tar::EntryType::Regular, "f", 0o644, 1));
    archive.extend(data(b"a"));
    archive.extend(end());
    let whole = archive.clone();
    archive.extend(raw(&header(tar::EntryType::Char, "late", 0o666, 0)));
    assert_eq!(guard_all(&archive).unwrap(), whole);
    // A single zero block and then more is not an end.
    let mut archive = raw(&header(tar::EntryType::Regular, "f", 0o644, 0));
    archive.extend(vec![0; BLOCK]);
    archive.extend(raw(&header(tar::EntryType::Regular, "g", 0o644, 0)));
    assert!(guard_all(&archive).is_err());
    // An empty upload is an empty archive.
    assert_eq!(guard(&[], 1).unwrap(), Vec::<u8>::new());
}

#[test]
fn numeric_fields_read_octal_and_base_256() {
    assert_eq!(numeric(b"0000644\0"), Some(0o644));
    assert_eq!(numeric(b"   644 \0"), Some(0o644));
    assert_eq!(numeric(b"\0\0\0\0"), Some(0));
    assert_eq!(
        numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00]),
        Some(256)
    );
    assert_eq!(numeric(&[0xff, 0xff, 0xff, 0xff]), None, "negative");
    assert_eq!(numeric(b"12x4"), None);
}
