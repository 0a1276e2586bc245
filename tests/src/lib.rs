//! # tessera-e2e
//!
//! Helpers for the end-to-end tests in `tests/`: start the real `tessera-relay` and
//! `tessera-host` binaries (built by `cargo build --release --workspace --bins`, which the test
//! command runs first) on loopback, read `/api/status`, and wait with bounded deadlines;
//! [`browser`] drives a real headless Chromium tab over the DevTools protocol; [`client`] is a
//! scripted participant over a real WebSocket (for participants that misbehave); [`attack`]
//! the attacks of the attack suite; [`stores`] a real PostgreSQL and S3-compatible server for
//! the relays of one run.

pub mod attack;
pub mod browser;
pub mod client;
pub mod stores;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_protocol::messages::{Hello, ParticipantKind};
use tessera_protocol::{PROTOCOL_VERSION, identity};

/// Runs `cmd` to its end: whether it succeeded, and what it printed (stdout, then stderr).
pub fn run_cmd(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `tessera-host` with `args` (see [`run_cmd`]).
pub fn host_cmd(args: &[&str]) -> (bool, String) {
    run_cmd(Command::new(bin("tessera-host")).args(args))
}

/// Path of a workspace binary in `target/<profile>/`: beside the running binary, or beside
/// the test executable's `deps/` folder.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("target/<profile>");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release --workspace --bins` first",
        path.display()
    );
    path
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) when dropped; its output goes to a log file.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its stdout+stderr log.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args` with output to `log`.
    pub fn spawn(program: &Path, args: &[String], log: PathBuf) -> Proc {
        Self::spawn_env(program, args, &[], log)
    }

    /// Starts `program args` with `env` added to its environment, output to `log`.
    pub fn spawn_env(
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: PathBuf,
    ) -> Proc {
        let out = File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Proc { child, log }
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill9(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }

    /// Its log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The lines of its log so far that contain `what`.
    pub fn lines_with(&self, what: &str) -> Vec<String> {
        self.output()
            .lines()
            .filter(|l| l.contains(what))
            .map(String::from)
            .collect()
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A relay on `port` with its database and checkpoints in `dir`.
pub fn start_relay(dir: &Path, port: u16, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--db".into(),
        dir.join("relay.db").display().to_string(),
        "--checkpoints".into(),
        dir.join("checkpoints").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let p = Proc::spawn(
        &bin("tessera-relay"),
        &args,
        dir.join(format!("relay-{n}.log")),
    );
    wait_until(Duration::from_secs(60), "relay answers /api/status", || {
        try_status(port).is_some()
    });
    p
}

/// A native participant joining the relay on `port`, on the CPU.
pub fn start_host(dir: &Path, port: u16, name: &str, extra: &[&str]) -> Proc {
    start_host_on(dir, port, name, "cpu", extra)
}

/// A native participant joining the relay on `port` with `backend` (`cpu`, `wgpu`).
pub fn start_host_on(dir: &Path, port: u16, name: &str, backend: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "join".into(),
        format!("ws://127.0.0.1:{port}/ws"),
        "--backend".into(),
        backend.into(),
        "--key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(&bin("tessera-host"), &args, dir.join(format!("{name}.log")))
}

/// `/api/status`, or `None` if the relay does not answer.
pub fn try_status(port: u16) -> Option<Value> {
    let mut resp = ureq::get(&format!("http://127.0.0.1:{port}/api/status"))
        .call()
        .ok()?;
    resp.body_mut().read_json().ok()
}

/// `/api/status` (panics if the relay does not answer).
pub fn status(port: u16) -> Value {
    try_status(port).expect("relay answers /api/status")
}

/// A relay's `/metrics` text, or `None` if it does not answer.
pub fn try_metrics(port: u16) -> Option<String> {
    ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()
}

/// A gauge or counter of a relay's `/metrics`; `None` if the relay does not answer or has no
/// such line.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    try_metrics(port)?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `cond` every 100 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    wait_until_or(timeout, what, cond, String::new);
}

/// As [`wait_until`], with `context()` (the processes' logs, say) in the panic's message.
pub fn wait_until_or(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    context: impl FnOnce() -> String,
) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "timed out after {timeout:?} waiting for: {what}\n{}",
        context()
    );
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The participant entry with `id` in a status.
pub fn participant<'a>(status: &'a Value, id: &str) -> Option<&'a Value> {
    status["participants"]
        .as_array()?
        .iter()
        .find(|p| p["id"] == id)
}

/// The participant id a host printed at start-up.
pub fn host_id(p: &Proc) -> Option<String> {
    p.output().lines().find_map(|l| {
        l.strip_prefix("participant ")
            .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
    })
}

/// A native participant's hello answering `nonce`, signed with `secret`.
pub fn signed_hello(secret: &[u8; 32], nonce: &[u8; 32], backend: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        public_key: identity::public_key(secret),
        signature: identity::sign(secret, &identity::hello_message(nonce)).to_vec(),
        kind: ParticipantKind::Native,
        backend: backend.into(),
        device: backend.into(),
        tokens_per_s: 0.0,
    }
}
