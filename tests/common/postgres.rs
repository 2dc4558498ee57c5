//! A PostgreSQL server of the test's own: a fresh cluster in a temporary
//! directory on a free loopback port, stopped and removed when dropped.
//! Binaries from `TETHER_PG_BIN` (default `/usr/lib/postgresql/15/bin`);
//! as root it runs as the `postgres` user, which `initdb` requires.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    bin: PathBuf,
    /// Settings beyond the defaults (`-c NAME=VALUE`).
    settings: Vec<String>,
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let tool = bin.join(tool);
    if nix_is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(tool);
        c
    } else {
        Command::new(tool)
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// (Its own copy of `common::free_port`: the benchmark includes this file
/// alone.)
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// A server that speaks TLS with this certificate and key (PEM).
    #[allow(dead_code)]
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Postgres {
        Postgres::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Postgres {
        let bin = PathBuf::from(
            std::env::var("TETHER_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        assert!(
            bin.join("postgres").exists(),
            "PostgreSQL is needed at {} (set TETHER_PG_BIN)",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        if nix_is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(ok.success(), "chown of the cluster directory");
        }
        let data = dir.path().join("data");
        let out = as_postgres(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut settings = Vec::new();
        if let Some((cert, key)) = tls {
            let (cert_file, key_file) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_file, cert).unwrap();
            std::fs::write(&key_file, key).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
            if nix_is_root() {
                let ok = Command::new("chown")
                    .arg("postgres:")
                    .arg(&cert_file)
                    .arg(&key_file)
                    .status()
                    .unwrap();
                assert!(ok.success(), "chown of the certificate");
            }
            settings.push("ssl=on".to_string());
            settings.push(format!("ssl_cert_file={}", cert_file.display()));
            settings.push(format!("ssl_key_file={}", key_file.display()));
        }
        let port = free_port();
        let child = server(&bin, dir.path(), port, &settings);
        let pg = Postgres {
            dir,
            port,
            child,
            bin,
            settings,
        };
        pg.wait_ready();
        pg
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (every connection to it ends), waits `down`, and
    /// starts it again on the same port and data.
    pub fn restart(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.child = server(&self.bin, self.dir.path(), self.port, &self.settings);
        self.wait_ready();
    }

    fn stop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `psql` as the superuser, connected to this server.
    fn psql(&self) -> Command {
        let mut c = Command::new(self.bin.join("psql"));
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        c
    }

    /// A new, empty database; its URL.
    pub fn database(&self, name: &str) -> String {
        let out = self
            .psql()
            .args(["-c", &format!("CREATE DATABASE {name}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "createdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` in `db`; the rows as psql prints them unaligned.
    pub fn query(&self, db: &str, sql: &str) -> String {
        let out = self
            .psql()
            .args(["-d", db, "-At", "-c", sql])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server process on `port`, its data and socket under `dir`.
fn server(bin: &Path, dir: &Path, port: u16, settings: &[String]) -> Child {
    let mut c = as_postgres(bin, "postgres");
    for s in settings {
        c.args(["-c", s]);
    }
    c.arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=50",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}
