//! A small W3C WebDriver client for the console's browser tests: it starts Debian's
//! `chromedriver` on a free loopback port, opens headless Chromium, and offers what the tests need
//! (navigate, find, click, type, read, run a script, screenshot, wait). The driver process is
//! killed (by its PID) when the [`Browser`] is dropped.

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Finds chromium and chromedriver; Err tells what to install.
/// Whether the browser tests can run here; on CI a missing Chromium fails the test instead.
pub fn available() -> bool {
    match locate() {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("browser tests need Chromium: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            false
        }
    }
}

pub fn locate() -> anyhow::Result<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| -> Option<PathBuf> {
        names.iter().find_map(|n| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(n))
                    .find(|p| p.is_file())
            })
        })
    };
    let browser = find(&["chromium", "chromium-browser", "google-chrome"])
        .ok_or_else(|| anyhow!("chromium not found (apt-get install chromium chromium-driver)"))?;
    let driver = find(&["chromedriver"])
        .ok_or_else(|| anyhow!("chromedriver not found (apt-get install chromium-driver)"))?;
    Ok((browser, driver))
}

pub struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

#[derive(Clone, Debug)]
pub struct Element(String);

impl Element {
    /// The element as a script argument.
    pub fn as_arg(&self) -> Value {
        json!({ ELEMENT_KEY: self.0 })
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width` x `height`.
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Self> {
        let (browser, driver_bin) = locate()?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", driver_bin.display()))?;
        let profile = tempfile::tempdir()?;
        let mut b = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = b.http.get(format!("{}/status", b.base)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not start on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": browser.to_string_lossy(),
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--no-first-run", "--disable-extensions", "--disable-background-networking",
                        "--disable-sync", "--disable-component-update", "--disable-default-apps",
                        format!("--window-size={width},{height}"),
                        format!("--user-data-dir={}", b._profile.path().display()),
                    ]
                }
            }}
        });
        let v = b.call("POST", "/session", Some(caps)).await?;
        let sid = v["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id in {v}"))?
            .to_string();
        b.base = format!("{}/session/{sid}", b.base);
        Ok(b)
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{}", self.base, path);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).json(&body.unwrap_or(json!({}))),
        };
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "webdriver {method} {path}: {} {}",
                v["value"]["error"].as_str().unwrap_or("error"),
                v["value"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
            );
        }
        Ok(v["value"].clone())
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call("POST", "/url", Some(json!({ "url": url })))
            .await?;
        Ok(())
    }

    pub async fn set_size(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await?;
        Ok(())
    }

    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        let v = self
            .call(
                "POST",
                "/elements",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT_KEY].as_str().map(|s| Element(s.to_string())))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits up to `timeout` for a displayed element matching `css`.
    pub async fn wait(&self, css: &str, timeout: Duration) -> anyhow::Result<Element> {
        let deadline = Instant::now() + timeout;
        loop {
            for e in self.find_all(css).await? {
                if self.displayed(&e).await.unwrap_or(false) {
                    return Ok(e);
                }
            }
            if Instant::now() > deadline {
                bail!("no visible element {css:?} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for an element matching `css` whose text contains `needle`.
    pub async fn wait_text(
        &self,
        css: &str,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<Element> {
        let deadline = Instant::now() + timeout;
        loop {
            for e in self.find_all(css).await? {
                if self.text(&e).await.unwrap_or_default().contains(needle) {
                    return Ok(e);
                }
            }
            if Instant::now() > deadline {
                bail!("no element {css:?} containing {needle:?} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to `timeout` until no element matches `css`.
    pub async fn wait_gone(&self, css: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.find_all(css).await?.is_empty() {
            if Instant::now() > deadline {
                bail!("{css:?} still present after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub async fn displayed(&self, e: &Element) -> anyhow::Result<bool> {
        Ok(self
            .call("GET", &format!("/element/{}/displayed", e.0), None)
            .await?
            .as_bool()
            .unwrap_or(false))
    }

    pub async fn click(&self, e: &Element) -> anyhow::Result<()> {
        self.call("POST", &format!("/element/{}/click", e.0), None)
            .await?;
        Ok(())
    }

    pub async fn clear(&self, e: &Element) -> anyhow::Result<()> {
        self.call("POST", &format!("/element/{}/clear", e.0), None)
            .await?;
        Ok(())
    }

    /// Types `text` into the element (keyboard events, as a user would).
    pub async fn type_into(&self, e: &Element, text: &str) -> anyhow::Result<()> {
        self.call(
            "POST",
            &format!("/element/{}/value", e.0),
            Some(json!({ "text": text })),
        )
        .await?;
        Ok(())
    }

    pub async fn text(&self, e: &Element) -> anyhow::Result<String> {
        Ok(self
            .call("GET", &format!("/element/{}/text", e.0), None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// A DOM property (e.g. "value", "checked").
    pub async fn property(&self, e: &Element, name: &str) -> anyhow::Result<Value> {
        self.call("GET", &format!("/element/{}/property/{name}", e.0), None)
            .await
    }

    pub async fn execute(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Presses a key on the focused element (e.g. "\u{E007}" = Enter, "\u{E004}" = Tab).
    pub async fn keys(&self, keys: &str) -> anyhow::Result<()> {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|c| {
                [
                    json!({"type": "keyDown", "value": c.to_string()}),
                    json!({"type": "keyUp", "value": c.to_string()}),
                ]
            })
            .collect();
        self.call(
            "POST",
            "/actions",
            Some(json!({ "actions": [{ "type": "key", "id": "kbd", "actions": actions }] })),
        )
        .await?;
        Ok(())
    }

    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self
            .call("GET", "/url", None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// Saves a PNG of the viewport.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let v = self.call("GET", "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .context("screenshot is not base64")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Closing the session ends Chromium; then the driver itself.
        let url = self.base.clone();
        if url.contains("/session/") {
            let _ = std::thread::spawn(move || {
                let _ = blocking_delete(&url);
            })
            .join();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// DELETE without an async runtime (used from Drop): plain HTTP/1.1 over a TCP socket.
fn blocking_delete(url: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    Ok(())
}

/// Where screenshots go: `$TERN_ARTIFACTS_DIR/screenshots`, default `<workspace>/artifacts/screenshots`.
pub fn screenshot_dir() -> PathBuf {
    let base = std::env::var_os("TERN_ARTIFACTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../artifacts"));
    base.join("screenshots")
}
