//! The audit trail of sandbox operations (through MCP or the HTTP API): one
//! JSON record per line in a file under the server's state directory,
//! rotated at a size bound (the current file and one older), read back with
//! filters (`tether ctl audit`).

use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One sandbox operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC.
    pub time: String,
    /// `operator` (the admin token), `token:<id>` (an organization's
    /// operator token) or `mcp-token:<id>` (never a secret).
    pub caller: String,
    /// The organization the operation was for (the caller's, or its
    /// node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// `mcp:sandbox.exec`, `api:spawn`, ...
    pub operation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// SHA-256 (first 16 hex digits) of the arguments, with file contents,
    /// standard input and environment values left out.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub args_digest: String,
    /// `ok`, or the error's code and message.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Bytes carried (output, file size), where the operation has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    pub duration_ms: u64,
}

impl AuditRecord {
    /// Now, for `caller` and `operation`.
    pub fn new(caller: &str, operation: &str) -> AuditRecord {
        AuditRecord {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            caller: caller.into(),
            operation: operation.into(),
            ..Default::default()
        }
    }
}

/// Longest id (`task_id`, `job_id`, `node_id`, `worker_id`) a record keeps.
const MAX_RECORD_ID: usize = 256;
/// Longest outcome a record keeps.
const MAX_RECORD_OUTCOME: usize = 1024;

impl AuditRecord {
    /// The record cut to a bounded size: ids and the outcome come from the
    /// caller's request (a refused spawn names what it was given), and the
    /// trail is shared by every organization, so no one record may be large
    /// enough to rotate the others out.
    pub fn bounded(mut self) -> AuditRecord {
        for id in [
            &mut self.task_id,
            &mut self.job_id,
            &mut self.node_id,
            &mut self.worker_id,
        ]
        .into_iter()
        .flatten()
        {
            cut(id, MAX_RECORD_ID);
        }
        cut(&mut self.outcome, MAX_RECORD_OUTCOME);
        self
    }
}

/// Cuts `s` to at most `max` bytes, at a character boundary, marking the cut.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
}

/// The digest of `args` with the values of secret-bearing or bulky members
/// (`content`, `content_base64`, `stdin`, `env`'s values) replaced.
pub fn digest(args: &serde_json::Value) -> String {
    let mut v = args.clone();
    if let Some(o) = v.as_object_mut() {
        for k in ["content", "content_base64", "stdin"] {
            if o.contains_key(k) {
                o.insert(k.into(), serde_json::Value::String("-".into()));
            }
        }
        if let Some(env) = o.get_mut("env").and_then(|e| e.as_object_mut()) {
            for val in env.values_mut() {
                *val = serde_json::Value::String("-".into());
            }
        }
    }
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))[..16].to_string()
}

/// The records of `records` made at or after `time` (RFC 3339); a record
/// whose time does not parse is kept.
pub fn since(records: Vec<AuditRecord>, time: &str) -> Vec<AuditRecord> {
    let Ok(from) = humantime::parse_rfc3339(time) else {
        return records;
    };
    records
        .into_iter()
        .filter(|r| humantime::parse_rfc3339(&r.time).map_or(true, |t| t >= from))
        .collect()
}

/// What to read back.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct AuditFilter {
    pub task: Option<String>,
    pub worker: Option<String>,
    /// Only this organization's records (an organization's operator always
    /// reads with its own).
    pub org: Option<String>,
}

/// The file (and its one rotated predecessor, `.1`).
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    lock: Mutex<()>,
}

/// Default size of the current file before it rotates.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

impl AuditLog {
    pub fn new(path: PathBuf, max_bytes: u64) -> AuditLog {
        AuditLog {
            path,
            max_bytes,
            lock: Mutex::new(()),
        }
    }

    fn rotated(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        p.into()
    }

    /// Appends a record (0600 file); rotates first when the file is full.
    pub fn append(&self, r: &AuditRecord) -> std::io::Result<()> {
        let _one = self.lock.lock().unwrap();
        if std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.max_bytes) {
            std::fs::rename(&self.path, self.rotated())?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode_0600()
            .open(&self.path)?;
        let mut line = serde_json::to_vec(r).expect("records serialize");
        line.push(b'\n');
        f.write_all(&line)
    }

    /// Records matching `f`, oldest first.
    pub fn read(&self, f: &AuditFilter) -> Vec<AuditRecord> {
        let _one = self.lock.lock().unwrap();
        let mut out = Vec::new();
        for p in [self.rotated(), self.path.clone()] {
            read_file(&p, f, &mut out);
        }
        out
    }
}

fn read_file(p: &Path, f: &AuditFilter, out: &mut Vec<AuditRecord>) {
    let Ok(file) = std::fs::File::open(p) else {
        return;
    };
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
        let Ok(r) = serde_json::from_str::<AuditRecord>(&line) else {
            continue;
        };
        let task_ok = f
            .task
            .as_ref()
            .is_none_or(|t| r.task_id.as_ref() == Some(t));
        let worker_ok = f
            .worker
            .as_ref()
            .is_none_or(|w| r.worker_id.as_ref() == Some(w))
            && f.org.as_ref().is_none_or(|o| r.org.as_ref() == Some(o));
        if task_ok && worker_ok {
            out.push(r);
        }
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_bounded_whatever_its_caller_gave() {
        let long = "é".repeat(100_000);
        let r = AuditRecord {
            task_id: Some(long.clone()),
            node_id: Some(long.clone()),
            outcome: long.clone(),
            ..AuditRecord::new("token:x", "api:spawn")
        }
        .bounded();
        assert!(r.task_id.as_ref().unwrap().len() <= MAX_RECORD_ID);
        assert!(r.node_id.as_ref().unwrap().ends_with("..."));
        assert!(r.outcome.len() <= MAX_RECORD_OUTCOME);
        assert!(serde_json::to_vec(&r).unwrap().len() < 4096);
        let short = AuditRecord::new("operator", "api:spawn");
        assert_eq!(short.clone().bounded(), short);
    }

    #[test]
    fn since_keeps_the_records_from_a_time_on() {
        let at = |time: &str| AuditRecord {
            time: time.into(),
            ..Default::default()
        };
        let records = vec![
            at("2026-12-07T10:00:00.999Z"),
            at("2026-12-07T10:00:01.000Z"),
            at("2026-12-07T10:00:01.500Z"),
            at("not a time"),
        ];
        let kept = since(records.clone(), "2026-12-07T10:00:01.000Z");
        assert_eq!(kept, records[1..].to_vec());
        // An organization made before its creation time was kept to the
        // millisecond has a time to the second.
        assert_eq!(since(records.clone(), "2026-12-07T10:00:01Z").len(), 3);
        assert_eq!(since(records.clone(), "garbage"), records);
    }

    #[test]
    fn records_survive_reopening_rotate_at_the_bound_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::new(path.clone(), 600);
        for i in 0..20 {
            let mut r = AuditRecord::new("operator", "api:spawn");
            r.task_id = Some(format!("t{}", i % 2));
            r.worker_id = Some(format!("w{i}"));
            r.outcome = "ok".into();
            log.append(&r).unwrap();
        }
        // Bounded: the current file and one older, each near the bound.
        let cur = std::fs::metadata(&path).unwrap().len();
        assert!(cur < 600 + 300, "{cur}");
        let all = AuditLog::new(path.clone(), 600).read(&AuditFilter::default());
        assert!(
            !all.is_empty() && all.len() < 20,
            "older records rotated away: {}",
            all.len()
        );
        assert_eq!(all.last().unwrap().worker_id.as_deref(), Some("w19"));
        let t1 = log.read(&AuditFilter {
            task: Some("t1".into()),
            ..Default::default()
        });
        assert!(t1.iter().all(|r| r.task_id.as_deref() == Some("t1")));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn the_digest_leaves_out_contents_and_env_values() {
        let a = serde_json::json!({"path": "/x", "content": "secret", "env": {"K": "v1"}});
        let b = serde_json::json!({"path": "/x", "content": "other", "env": {"K": "v2"}});
        let c = serde_json::json!({"path": "/y", "content": "secret", "env": {"K": "v1"}});
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(digest(&a), digest(&c));
    }
}
