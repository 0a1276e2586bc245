//! A real headless Chromium (Debian's `/usr/bin/chromium`, never a downloaded one) driven over
//! the Chrome DevTools Protocol: open the relay's page, read `window.tessera`, click, take
//! screenshots. Started with the closed-network flags and a fresh profile; killed with its whole
//! process group when dropped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message, WebSocket, stream::MaybeTlsStream};

/// Whether the tab gets a WebGPU adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpu {
    /// `--enable-unsafe-webgpu`: SwiftShader's WebGPU adapter on a machine without a GPU.
    WebGpu,
    /// `--disable-gpu` and no WebGPU flag: `requestAdapter()` finds nothing.
    None,
}

/// The Chromium binary: `$TESSERA_CHROMIUM` or `/usr/bin/chromium`.
pub fn chromium() -> PathBuf {
    let path = std::env::var_os("TESSERA_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} is missing: the test command installs Debian's chromium",
        path.display()
    );
    path
}

/// The repository root: the nearest folder at or above the working directory that holds
/// `crates/web` (cargo runs tests in `tests/`, benchmarks run from the root). Found at run
/// time, not baked in at compile time, so a build cache shared between clones stays correct.
pub fn repo_root() -> PathBuf {
    let cwd = std::env::current_dir().expect("working directory");
    cwd.ancestors()
        .find(|d| d.join("crates/web/Cargo.toml").is_file())
        .unwrap_or_else(|| panic!("{} is not inside the repository", cwd.display()))
        .to_path_buf()
}

/// The built browser bundle: `$TESSERA_WEB_BUNDLE`, or `web/pkg` (`tools/build-web.sh`).
pub fn web_bundle() -> PathBuf {
    let dir = std::env::var_os("TESSERA_WEB_BUNDLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("web/pkg"));
    assert!(
        dir.join("tessera_web_bg.wasm").exists(),
        "{} has no bundle: run tools/build-web.sh (the test command does)",
        dir.display()
    );
    dir.canonicalize().expect("bundle path")
}

/// A headless Chromium with one page open.
pub struct Browser {
    child: Child,
    cdp: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
    /// Chromium's own log.
    pub log: PathBuf,
}

impl Browser {
    /// Starts Chromium on `url`; its log goes to `log`.
    pub fn open(url: &str, gpu: Gpu, log: PathBuf) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            "--disable-default-apps",
            "--window-size=1000,1500",
            "--remote-debugging-port=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        match gpu {
            Gpu::WebGpu => args.push("--enable-unsafe-webgpu".into()),
            Gpu::None => args.push("--disable-gpu".into()),
        }
        args.push(url.into());
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(chromium());
        cmd.args(&args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().expect("starting chromium");
        // Chromium writes the DevTools port it picked into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let end = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse::<u16>().ok())
            {
                break p;
            }
            assert!(
                Instant::now() < end,
                "chromium did not open its DevTools port; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let targets: Value = ureq::get(&format!("http://127.0.0.1:{port}/json/list"))
            .call()
            .expect("DevTools target list")
            .body_mut()
            .read_json()
            .expect("DevTools JSON");
        let ws_url = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let (cdp, _) = tungstenite::connect(ws_url.as_str()).expect("DevTools WebSocket");
        if let MaybeTlsStream::Plain(s) = cdp.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        }
        Browser {
            child,
            cdp,
            next_id: 1,
            _profile: profile,
            log,
        }
    }

    /// How long one DevTools call may wait for its reply (default 120 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        if let MaybeTlsStream::Plain(s) = self.cdp.get_ref() {
            s.set_read_timeout(Some(timeout)).ok();
        }
    }

    /// Calls a DevTools method and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    /// Calls a DevTools method: its result, or its error.
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params});
        self.cdp
            .send(Message::Text(msg.to_string().into()))
            .expect("DevTools send");
        loop {
            let reply = self.cdp.read().expect("DevTools reply");
            let Message::Text(text) = reply else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    return Err(e.clone());
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its JSON value. While the
    /// page is still being swapped into its own process (the relay's cross-origin isolation
    /// headers make the first navigation do that) there is no context yet: it waits for one.
    pub fn eval(&mut self, expr: &str) -> Value {
        let params = json!({"expression": expr, "returnByValue": true, "awaitPromise": true});
        let end = Instant::now() + Duration::from_secs(30);
        let r = loop {
            match self.try_call("Runtime.evaluate", params.clone()) {
                Ok(r) => break r,
                Err(e)
                    if Instant::now() < end
                        && e.to_string()
                            .contains("Cannot find default execution context") =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("Runtime.evaluate failed: {e}"),
            }
        };
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr} threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// `window.tessera`, the page's view of its participant (null before the page ran).
    pub fn tab(&mut self) -> Value {
        self.eval("JSON.parse(JSON.stringify(window.tessera ?? null))")
    }

    /// Saves a PNG of the whole page.
    pub fn screenshot(&mut self, path: &Path) {
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Chromium's log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the browser, its GPU and renderer processes.
        // `--` matters: procps reads `kill -9 -PID` as options and signals every process.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .status();
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Where the tests leave screenshots (under the target directory, never committed).
pub fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("TESSERA_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("test-artifacts"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
