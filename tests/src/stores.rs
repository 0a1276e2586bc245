//! The production stores, really run: a PostgreSQL server (Debian's `postgresql` binaries,
//! started in a temporary directory, as an unprivileged user when the tests run as root since
//! `initdb` refuses root) and an S3-compatible server (moto's, from the test command's venv:
//! `TESSERA_PYTHON`'s `moto_server`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, bin, free_port, run_cmd, wait_until};

/// The folder of the newest installed PostgreSQL's binaries (`TESSERA_PG_BIN` overrides).
pub fn postgres_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("TESSERA_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.retain(|p| p.join("initdb").exists());
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().expect(
        "no PostgreSQL in /usr/lib/postgresql/*/bin: install Debian's postgresql \
         (tools/test-all.sh does) or set TESSERA_PG_BIN",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command run as `nobody` when we are root (PostgreSQL refuses to run as root).
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--reset-env",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL server of its own, stopped (SIGKILL) when dropped.
pub struct Postgres {
    /// The server process.
    pub proc: Proc,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Postgres {
    /// Creates a cluster in `dir/pg` (trust authentication, superuser `tessera`) and starts it.
    pub fn start(dir: &Path) -> Postgres {
        let bin = postgres_bin();
        let data = dir.join("pg");
        std::fs::create_dir_all(&data).unwrap();
        if is_root() {
            for p in [dir, &data] {
                let (ok, out) = run_cmd(Command::new("chown").args(["nobody:nogroup"]).arg(p));
                assert!(ok, "chown {}: {out}", p.display());
            }
        }
        let (ok, out) = run_cmd(
            as_server_user(&bin.join("initdb"))
                .args(["-U", "tessera", "-A", "trust", "-E", "UTF8", "-D"])
                .arg(&data),
        );
        assert!(ok, "initdb failed: {out}");
        let port = free_port();
        let log = dir.join("postgres.log");
        let server = as_server_user(&bin.join("postgres"));
        let mut args: Vec<String> = server
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        args.extend(
            [
                "-D",
                &data.display().to_string(),
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ]
            .map(String::from),
        );
        let proc = Proc::spawn(Path::new(server.get_program()), &args, log);
        let pg = Postgres { proc, port };
        wait_until(
            Duration::from_secs(60),
            "PostgreSQL accepts connections",
            || postgres::Client::connect(&pg.url(), postgres::NoTls).is_ok(),
        );
        pg
    }

    /// Its connection URL.
    pub fn url(&self) -> String {
        format!("postgres://tessera@127.0.0.1:{}/postgres", self.port)
    }

    /// A client.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).unwrap()
    }
}

/// An S3-compatible server (moto's), with one bucket, stopped when dropped.
pub struct S3 {
    /// The server process.
    pub proc: Proc,
    /// Its endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl S3 {
    /// Starts moto's server from the test command's venv and creates `bucket`.
    pub fn start(dir: &Path, bucket: &str) -> S3 {
        let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
        let server = Path::new(&python).with_file_name("moto_server");
        assert!(
            server.exists(),
            "{} is missing: install moto[server] in the venv of TESSERA_PYTHON (tools/test-all.sh does)",
            server.display()
        );
        let port = free_port();
        let proc = Proc::spawn(
            &server,
            &[
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
            dir.join("s3.log"),
        );
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_until(Duration::from_secs(60), "the S3 server answers", || {
            ureq::put(&format!("{endpoint}/{bucket}"))
                .send_empty()
                .is_ok()
        });
        S3 { proc, endpoint }
    }

    /// The environment a relay reads the store's address and credentials from.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "tessera"),
            ("AWS_SECRET_ACCESS_KEY", "tessera-secret"),
            ("AWS_REGION", "us-east-1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec()
    }
}

/// A relay of one run on `pg` and `s3` (`--store`, `--blobs s3://tessera/run`, the run's key
/// in `dir`, its own checkpoints, a 2 s lead timeout), logging to `dir/relay-{name}.log`, with
/// `extra` arguments (`--edge`, the run's options).
pub fn relay_with(
    dir: &Path,
    name: &str,
    port: u16,
    pg: &Postgres,
    s3: &S3,
    extra: &[&str],
) -> Proc {
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--store",
        &pg.url(),
        "--blobs",
        "s3://tessera/run",
        "--key",
        &dir.join("relay.key").display().to_string(),
        "--checkpoints",
        &dir.join(format!("{name}-ck")).display().to_string(),
        "--db",
        &dir.join(format!("{name}.db")).display().to_string(),
        "--lead-timeout-ms",
        "2000",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    Proc::spawn_env(
        &bin("tessera-relay"),
        &args,
        &s3.env(),
        dir.join(format!("relay-{name}.log")),
    )
}
