//! What a file upload may carry, checked as the tar stream passes on its way
//! to the engine. Docker extracts an upload as root, with the modes, owners
//! and extended attributes the archive names, and a worker's writable bind
//! is a directory of the host: an archive could leave there a setuid-root
//! program, a file with capabilities or a device node (a raw disk) for any
//! host user to use. So, whatever the server sends:
//!
//! - entries are regular files, directories and links (hard and symbolic);
//!   a device node, a FIFO, a sparse or a multi-volume entry refuses the
//!   whole upload;
//! - setuid and setgid bits are cleared;
//! - extended attributes are dropped, except `user.*` ones (`security.*`
//!   holds file capabilities and SELinux labels, `trusted.*` is root's);
//! - the stream is a plain tar: Docker would decompress a stream that starts
//!   with a gzip, bzip2, xz or zstd signature, and a gzip header can carry a
//!   harmless-looking archive in its extra field in front of a compressed
//!   one, so such a start is refused.
//!
//! The guard reads headers the way Go's `archive/tar` (Docker's reader) does
//! where that is unambiguous, and refuses where readers differ (a size on a
//! header-only entry, a legacy entry whose name could make it a directory,
//! a global header after a pending one), so that it and the engine never
//! disagree on where an entry's data ends. File data passes through without
//! a copy; only headers are read and, when changed, rewritten.

use bytes::{Bytes, BytesMut};

const BLOCK: usize = 512;
/// Largest PAX extended header read (Go's limit for its own reader).
const MAX_PAX: u64 = 1 << 20;
/// Largest GNU long name or link.
const MAX_LONG_NAME: u64 = 1 << 20;
/// Mode bits never extracted.
const SETID: u64 = 0o6000;

/// Why an upload is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a tar stream the guard can follow.
    #[error("the upload is not a plain tar archive: {0}")]
    Malformed(String),
    /// An entry of a kind that is never extracted.
    #[error(
        "the upload holds {kind} {name:?}: uploads carry regular files, directories and links only"
    )]
    Kind { kind: &'static str, name: String },
}

#[derive(Debug)]
enum State {
    /// Expecting a header block (`acc` holds a partial one).
    Header,
    /// Inside an entry's data and padding: bytes to pass unread.
    Data(u64),
    /// Reading a PAX extended header's data: `acc` holds the header block
    /// and the data so far; `total` is the data's size.
    Pax { total: u64 },
    /// Reading a GNU long name: `acc` holds the data so far.
    LongName { total: u64 },
    /// One zero block seen: the next must be zero too.
    OneZero,
    /// Two zero blocks: the archive has ended; anything after is dropped.
    End,
}

/// Follows a tar stream chunk by chunk.
#[derive(Debug)]
pub struct TarGuard {
    state: State,
    acc: BytesMut,
    /// Whether a header was read yet (the first is checked for a
    /// compressed stream's signature).
    started: bool,
    /// The `size` of a pending PAX header, for the next entry.
    pax_size: Option<u64>,
    /// A PAX header or GNU long name/link waits for its entry.
    pending_meta: bool,
    /// The pending GNU long name, if any (its last byte decides whether a
    /// legacy entry is a directory).
    long_name: Option<Vec<u8>>,
    /// A pending PAX `path`, for the same reason.
    pax_path: Option<Vec<u8>>,
}

impl Default for TarGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl TarGuard {
    pub fn new() -> Self {
        TarGuard {
            state: State::Header,
            acc: BytesMut::new(),
            started: false,
            pax_size: None,
            pending_meta: false,
            long_name: None,
            pax_path: None,
        }
    }

    /// Passes `chunk` on: the pieces to send, in order (usually the chunk
    /// itself).
    pub fn push(&mut self, chunk: Bytes) -> Result<Vec<Bytes>, Refused> {
        let mut out = Vec::new();
        let (mut pos, mut from) = (0usize, 0usize);
        let len = chunk.len();
        let flush = |out: &mut Vec<Bytes>, from: usize, to: usize| {
            if to > from {
                out.push(chunk.slice(from..to));
            }
        };
        while pos < len {
            match &mut self.state {
                State::Data(left) => {
                    let n = (*left).min((len - pos) as u64);
                    *left -= n;
                    pos += n as usize;
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
                State::End => {
                    flush(&mut out, from, pos);
                    return Ok(out);
                }
                State::Header | State::OneZero if self.acc.is_empty() && len - pos >= BLOCK => {
                    let mut block = [0u8; BLOCK];
                    block.copy_from_slice(&chunk[pos..pos + BLOCK]);
                    match self.header(&mut block)? {
                        Next::Keep => pos += BLOCK,
                        Next::Rewritten => {
                            flush(&mut out, from, pos);
                            out.push(Bytes::copy_from_slice(&block));
                            pos += BLOCK;
                            from = pos;
                        }
                        Next::Hold => {
                            // A PAX header or long name: held until its data
                            // is read (it may be rewritten).
                            flush(&mut out, from, pos);
                            self.acc.extend_from_slice(&block);
                            pos += BLOCK;
                            from = pos;
                        }
                        Next::Drop => {
                            // The second zero block goes on; nothing after.
                            flush(&mut out, from, pos + BLOCK);
                            return Ok(out);
                        }
                    }
                }
                State::Header | State::OneZero => {
                    flush(&mut out, from, pos);
                    let take = (BLOCK - self.acc.len()).min(len - pos);
                    self.acc.extend_from_slice(&chunk[pos..pos + take]);
                    pos += take;
                    from = pos;
                    if self.acc.len() == BLOCK {
                        let mut block = [0u8; BLOCK];
                        block.copy_from_slice(&self.acc);
                        self.acc.clear();
                        match self.header(&mut block)? {
                            Next::Keep | Next::Rewritten => {
                                out.push(Bytes::copy_from_slice(&block));
                            }
                            Next::Hold => self.acc.extend_from_slice(&block),
                            Next::Drop => {
                                out.push(Bytes::copy_from_slice(&block));
                                return Ok(out);
                            }
                        }
                    }
                }
                State::Pax { total } | State::LongName { total } => {
                    let total = *total;
                    let want = BLOCK as u64 + padded(total);
                    let take = ((want - self.acc.len() as u64) as usize).min(len - pos);
                    flush(&mut out, from, pos);
                    self.acc.extend_from_slice(&chunk[pos..pos + take]);
                    pos += take;
                    from = pos;
                    if self.acc.len() as u64 == want {
                        let held = std::mem::take(&mut self.acc);
                        out.push(self.meta_done(held, total)?);
                        self.state = State::Header;
                    }
                }
            }
        }
        flush(&mut out, from, pos);
        Ok(out)
    }

    /// Checks that the stream ended where an archive may end.
    pub fn finish(&self) -> Result<(), Refused> {
        match self.state {
            State::Header | State::OneZero | State::End if self.acc.is_empty() => {
                if self.pending_meta {
                    Err(malformed("the archive ends after an extended header"))
                } else {
                    Ok(())
                }
            }
            _ => Err(malformed("the archive ends inside an entry")),
        }
    }

    /// Reads one header block (and may rewrite it in place).
    fn header(&mut self, block: &mut [u8; BLOCK]) -> Result<Next, Refused> {
        if block.iter().all(|b| *b == 0) {
            return Ok(match self.state {
                State::OneZero => {
                    self.state = State::End;
                    Next::Drop
                }
                _ if self.pending_meta => {
                    return Err(malformed("the archive ends after an extended header"));
                }
                _ => {
                    self.state = State::OneZero;
                    Next::Keep
                }
            });
        }
        if matches!(self.state, State::OneZero) {
            return Err(malformed("a zero block inside the archive"));
        }
        if !self.started {
            self.started = true;
            compressed(block)?;
        }
        check_sum(block)?;
        let name = field_str(&block[0..100]);
        let size = numeric(&block[124..136])
            .ok_or_else(|| malformed(format!("{name:?}: unreadable size")))?;
        let flag = block[156];
        match flag {
            b'x' => {
                if size > MAX_PAX {
                    return Err(malformed("an extended header over 1 MiB"));
                }
                self.state = State::Pax { total: size };
                self.pending_meta = true;
                Ok(Next::Hold)
            }
            b'L' | b'K' => {
                if size > MAX_LONG_NAME {
                    return Err(malformed("a long name over 1 MiB"));
                }
                self.state = State::LongName { total: size };
                self.pending_meta = true;
                // Only a long name matters (a long link's target does not
                // change what the entry is); both are held the same way.
                Ok(Next::Hold)
            }
            b'g' => {
                // Go's reader lets a global header take the place of a
                // pending one; others do not: refused rather than guessed.
                if self.pending_meta {
                    return Err(malformed("a global header after an extended one"));
                }
                self.skip(size);
                Ok(Next::Keep)
            }
            b'0' | b'7' | 0 | b'1' | b'2' | b'5' => {
                let size = self.pax_size.take().unwrap_or(size);
                let header_only = matches!(flag, b'1' | b'2' | b'5');
                if header_only && size != 0 {
                    return Err(malformed(format!(
                        "{name:?}: a link or directory with data"
                    )));
                }
                if flag == 0 && size != 0 {
                    // A legacy entry is a directory if its name ends in
                    // `/`, and then has no data: which name counts differs
                    // between readers, so any of them ending so is refused.
                    let names = [
                        Some(name.as_bytes().to_vec()),
                        self.long_name.take(),
                        self.pax_path.take(),
                    ];
                    let dir_like = names
                        .iter()
                        .flatten()
                        .any(|n| n.is_empty() || n.ends_with(b"/"));
                    if dir_like {
                        return Err(malformed(format!(
                            "{name:?}: a legacy entry that may be a directory, with data"
                        )));
                    }
                }
                self.long_name = None;
                self.pax_path = None;
                self.pending_meta = false;
                let rewritten = if header_only && flag != b'5' {
                    false
                } else {
                    clear_setid(block, &name)?
                };
                self.skip(size);
                Ok(if rewritten {
                    Next::Rewritten
                } else {
                    Next::Keep
                })
            }
            b'3' => Err(kind("a character device", name)),
            b'4' => Err(kind("a block device", name)),
            b'6' => Err(kind("a FIFO", name)),
            b'S' => Err(kind("a sparse file", name)),
            other => Err(kind(
                match other {
                    b'M' => "a multi-volume entry",
                    b'V' => "a volume label",
                    _ => "an entry of an unknown type",
                },
                name,
            )),
        }
    }

    fn skip(&mut self, size: u64) {
        let n = padded(size);
        self.state = if n == 0 {
            State::Header
        } else {
            State::Data(n)
        };
    }

    /// A PAX header or long name is complete in `held` (its header block,
    /// then its padded data): returns what to send in its place.
    fn meta_done(&mut self, held: BytesMut, total: u64) -> Result<Bytes, Refused> {
        let flag = held[156];
        let data = &held[BLOCK..BLOCK + total as usize];
        if flag != b'x' {
            if flag == b'L' {
                let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
                self.long_name = Some(data[..end].to_vec());
            }
            return Ok(held.freeze());
        }
        let mut kept = Vec::with_capacity(data.len());
        let mut rest = data;
        let mut size = None;
        let mut path = None;
        while !rest.is_empty() {
            let (rec, key, value) = pax_record(rest)?;
            rest = &rest[rec.len()..];
            if key.starts_with(b"GNU.sparse.") {
                return Err(kind("a sparse file", "(PAX)".into()));
            }
            if key == b"size" {
                let v = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| malformed("a PAX size that is not a number"))?;
                size = Some(v);
            }
            if key == b"path" {
                path = Some(value.to_vec());
            }
            if let Some(attr) = key.strip_prefix(b"SCHILY.xattr.")
                && !attr.starts_with(b"user.")
            {
                continue;
            }
            kept.extend_from_slice(rec);
        }
        // A later PAX header replaces an earlier one (as in Go's reader).
        self.pax_size = size;
        self.pax_path = path;
        if kept.len() == data.len() {
            return Ok(held.freeze());
        }
        let mut header = [0u8; BLOCK];
        header.copy_from_slice(&held[..BLOCK]);
        set_octal(&mut header[124..136], kept.len() as u64);
        set_sum(&mut header);
        let mut out = BytesMut::with_capacity(BLOCK + padded(kept.len() as u64) as usize);
        out.extend_from_slice(&header);
        out.extend_from_slice(&kept);
        out.resize(BLOCK + padded(kept.len() as u64) as usize, 0);
        Ok(out.freeze())
    }
}

enum Next {
    /// The block passes as it is.
    Keep,
    /// The block was changed in place.
    Rewritten,
    /// The block starts data that is read before anything is sent.
    Hold,
    /// The archive ended: nothing more is sent.
    Drop,
}

fn malformed(why: impl Into<String>) -> Refused {
    Refused::Malformed(why.into())
}

fn kind(kind: &'static str, name: String) -> Refused {
    Refused::Kind { kind, name }
}

/// `n` rounded up to whole blocks.
fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// The stream's first block must not start with one of the signatures
/// Docker decompresses.
fn compressed(start: &[u8]) -> Result<(), Refused> {
    const SIGNATURES: [(&[u8], &str); 4] = [
        (&[0x1f, 0x8b, 0x08], "gzip"),
        (b"BZh", "bzip2"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    ];
    for (sig, name) in SIGNATURES {
        if start.starts_with(sig) {
            return Err(malformed(format!(
                "it starts like {name} data (send an uncompressed tar)"
            )));
        }
    }
    // zstd skippable frames: 0x184D2A50..=0x184D2A5F, little-endian.
    if start.len() >= 4 && start[0] & 0xf0 == 0x50 && start[1..4] == [0x2a, 0x4d, 0x18] {
        return Err(malformed(
            "it starts like zstd data (send an uncompressed tar)",
        ));
    }
    Ok(())
}

/// A header's checksum must hold, as an unsigned or a signed sum (both are
/// accepted by Go's reader).
fn check_sum(block: &[u8; BLOCK]) -> Result<(), Refused> {
    let want = numeric(&block[148..156]).ok_or_else(|| malformed("an unreadable checksum"))?;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { *b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if want == unsigned || i64::try_from(want).is_ok_and(|w| w == signed) {
        Ok(())
    } else {
        Err(malformed("a header whose checksum does not match"))
    }
}

fn set_sum(block: &mut [u8; BLOCK]) {
    block[148..156].fill(b' ');
    let sum: u64 = block.iter().map(|b| u64::from(*b)).sum();
    // Six octal digits, NUL, space: the common layout.
    let s = format!("{sum:06o}\0 ");
    block[148..156].copy_from_slice(s.as_bytes());
}

/// Writes `v` as zero-padded octal with a trailing NUL into `field`.
fn set_octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}\0");
    field.copy_from_slice(s.as_bytes());
}

/// Clears the setuid and setgid bits of a header's mode; whether it did.
fn clear_setid(block: &mut [u8; BLOCK], name: &str) -> Result<bool, Refused> {
    let mode =
        numeric(&block[100..108]).ok_or_else(|| malformed(format!("{name:?}: unreadable mode")))?;
    if mode & SETID == 0 {
        return Ok(false);
    }
    set_octal(&mut block[100..108], mode & !SETID);
    set_sum(block);
    Ok(true)
}

/// A numeric field: octal (NUL or space padded), or base-256 when its first
/// byte has the high bit set. Negative or overflowing values are `None`.
fn numeric(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return None;
        }
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    let trimmed: &[u8] = {
        let s = field
            .iter()
            .position(|b| *b != b' ' && *b != 0)
            .unwrap_or(field.len());
        let e = field
            .iter()
            .rposition(|b| *b != b' ' && *b != 0)
            .map_or(s, |e| e + 1);
        &field[s..e.max(s)]
    };
    if trimmed.is_empty() {
        return Some(0);
    }
    let end = trimmed
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(trimmed.len());
    u64::from_str_radix(std::str::from_utf8(&trimmed[..end]).ok()?, 8).ok()
}

/// A NUL-terminated name field, for messages and the directory rule.
fn field_str(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// A PAX record: the whole record, its key and its value.
type Record<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// One PAX record `"%d %s=%s\n"`.
fn pax_record(s: &[u8]) -> Result<Record<'_>, Refused> {
    let bad = || malformed("a malformed PAX record");
    let sp = s.iter().position(|b| *b == b' ').ok_or_else(bad)?;
    let n: usize = std::str::from_utf8(&s[..sp])
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)?;
    if n < 5 || n > s.len() || n <= sp + 1 || s[n - 1] != b'\n' {
        return Err(bad());
    }
    let rec = &s[sp + 1..n - 1];
    let eq = rec.iter().position(|b| *b == b'=').ok_or_else(bad)?;
    Ok((&s[..n], &rec[..eq], &rec[eq + 1..]))
}

#[cfg(test)]
mod tests;
