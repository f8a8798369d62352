//! The `/docs` page in a real headless Chromium, driven over plain WebDriver HTTP:
//! agent info, examples, streaming replies over `/ws`, multi-turn on one socket, a new
//! conversation, the sessions panel, and a file upload.
//!
//! Needs `chromium` and `chromedriver`; without them the test is skipped, unless
//! `OONODE_REQUIRE_BROWSER=1`, when it fails. Everything stays on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use oonode::agent::{Echo, Translator};
use oonode::{Agent, AgentError, Host, StreamSink, Turn};
use reqwest::Method;
use serde_json::{json, Value};

/// How long any one wait in the browser may take.
const WAIT: Duration = Duration::from_secs(20);
/// Starting the browser on a busy machine can take longer than one step.
const START: Duration = Duration::from_secs(60);
/// The W3C WebDriver key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Streams its prompt one word at a time, slowly enough for a test to watch; fails
/// (after streaming) when the prompt mentions "fail".
#[derive(Clone)]
struct Slow;

#[oonode::async_trait]
impl Agent for Slow {
    fn name(&self) -> String {
        "slow".into()
    }

    async fn run(&mut self, turn: Turn, stream: &StreamSink) -> Result<String, AgentError> {
        for word in turn.prompt.split_inclusive(' ') {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stream.send(word).await;
        }
        if turn.prompt.contains("fail") {
            return Err("asked to fail".into());
        }
        Ok(turn.prompt)
    }
}

fn find_binary(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push("/usr/bin".into());
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// The chromedriver child and the browser session it runs; dropping it ends both, also
/// when the test panics.
struct Driver {
    child: common::Child,
    port: u16,
    session: Option<String>,
}

impl Driver {
    fn spawn(chromedriver: &Path, log: &Path) -> Driver {
        let port = free_port();
        let mut cmd = Command::new(chromedriver);
        cmd.arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()));
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = common::Child::spawn("chromedriver", &mut cmd, Stderr::Null);
        Driver {
            child,
            port,
            session: None,
        }
    }

    /// Ends the session with a plain blocking request (Drop cannot await).
    fn delete_session_blocking(&mut self) {
        let Some(id) = self.session.take() else {
            return;
        };
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        let req = format!(
            "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        if s.write_all(req.as_bytes()).is_ok() {
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.delete_session_blocking();
        // chromedriver and every browser process in its own process group; the child is
        // then reaped when `self.child` drops.
        let pid = self.child.pid();
        #[cfg(unix)]
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    }
}

/// A WebDriver session over plain HTTP.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
}

async fn webdriver(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    body: Option<Value>,
    timeout: Duration,
) -> Result<Value, String> {
    let mut req = http.request(method.clone(), url).timeout(timeout);
    if let Some(b) = body {
        req = req.json(&b);
    } else if method == Method::POST {
        req = req.json(&json!({}));
    }
    let res = req
        .send()
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = res.status();
    let body: Value = res
        .json()
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let value = body.get("value").cloned().unwrap_or(Value::Null);
    if !status.is_success() || value.get("error").is_some() {
        return Err(format!(
            "{method} {url}: {status}: {} {}",
            value["error"].as_str().unwrap_or(""),
            value["message"].as_str().unwrap_or(""),
        ));
    }
    Ok(value)
}

impl Browser {
    async fn start(driver: &mut Driver, chromium: &Path, profile: &Path) -> Browser {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let base = format!("http://127.0.0.1:{}", driver.port);
        // chromedriver is up once /status says ready.
        let deadline = Instant::now() + START;
        loop {
            let ready = webdriver(
                &http,
                Method::GET,
                &format!("{base}/status"),
                None,
                Duration::from_secs(2),
            )
            .await;
            if matches!(&ready, Ok(v) if v["ready"] == true) {
                break;
            }
            if let Some(status) = driver.child.try_wait() {
                panic!("chromedriver exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready: {ready:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_str().unwrap(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-proxy-server", format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let created = webdriver(
            &http,
            Method::POST,
            &format!("{base}/session"),
            Some(caps),
            START,
        )
        .await
        .expect("a browser session starts");
        let session = created["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        driver.session = Some(session.clone());
        let browser = Browser {
            http,
            base,
            session,
        };
        browser.resize(1280, 860).await;
        browser
    }

    async fn resize(&self, width: u32, height: u32) {
        self.call(
            Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    async fn try_call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        webdriver(&self.http, method, &url, body, WAIT).await
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn goto(&self, url: &str) {
        self.call(Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn script(&self, script: &str, args: Value) -> Value {
        self.call(
            Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Runs `script` until `done` accepts its value; fails after [`WAIT`].
    async fn wait_for(
        &self,
        what: &str,
        script: &str,
        args: Value,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.script(script, args.clone()).await;
            if done(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; last seen: {v}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn text_of(&self, css: &str) -> String {
        let v = self
            .script(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                json!([css]),
            )
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element id for {css}: {v}"))
            .to_string()
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(Method::POST, &format!("/element/{id}/click"), None)
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(
            Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn value_of(&self, css: &str) -> String {
        let id = self.find(css).await;
        let v = self
            .call(Method::GET, &format!("/element/{id}/property/value"), None)
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Waits until the page shows `n` finished replies and returns the text of the
    /// last; an ERROR shown instead fails the test with its text.
    async fn reply(&self, n: usize) -> String {
        let (ok, text) = self.outcome(n).await;
        assert!(ok, "reply #{n} failed: {text}");
        text
    }

    /// Waits until reply `n` is finished: (true, text) for an OUTPUT, (false, text) for
    /// an ERROR.
    async fn outcome(&self, n: usize) -> (bool, String) {
        let replies = self
            .wait_for(
                &format!("reply #{n}"),
                "return Array.from(document.querySelectorAll('#messages .reply'))
                    .map(e => ({cls: e.className, text: e.textContent}));",
                json!([]),
                |v| {
                    v.as_array()
                        .and_then(|a| a.get(n - 1))
                        .and_then(|r| r["cls"].as_str())
                        .is_some_and(|c| c.contains("done") || c.contains("error"))
                },
            )
            .await;
        let last = &replies[n - 1];
        let cls = last["cls"].as_str().unwrap();
        let text = last["text"].as_str().unwrap().to_string();
        assert_eq!(
            replies.as_array().unwrap().len(),
            n,
            "one reply per turn: {replies}"
        );
        let ok = cls.split_whitespace().any(|c| c == "done") && !cls.contains("error");
        (ok, text)
    }

    /// Closes the page's WebSocket as a network drop would, and waits until the page
    /// noticed.
    async fn drop_socket(&self) {
        self.script(
            "window.droppedSocket = window.oonodeDocs.socket; window.droppedSocket.close();",
            json!([]),
        )
        .await;
        // The page's close handler runs in the same task that marks the socket CLOSED.
        self.wait_for(
            "the page's socket to close",
            "return window.droppedSocket.readyState;",
            json!([]),
            |v| v == 3,
        )
        .await;
    }

    async fn screenshot(&self, to: &Path) {
        let b64 = self.call(Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 screenshot"))
            .expect("screenshot decodes");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, png).expect("screenshot saved");
    }

    async fn close(self, driver: &mut Driver) {
        self.call(Method::DELETE, "", None).await;
        driver.session = None;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_page_in_headless_chromium() {
    let chromium = find_binary(
        "OONODE_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let chromedriver = find_binary("OONODE_CHROMEDRIVER", &["chromedriver"]);
    let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
        if std::env::var("OONODE_REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("OONODE_REQUIRE_BROWSER=1 but chromium and/or chromedriver is not installed (looked on PATH and in /usr/bin)");
        }
        println!("skipped: chromium/chromedriver not installed");
        return;
    };
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // No summary or examples given: the page shows the translator's own.
    let translator = TestNode::start(Host::new(Translator), &dir.path().join("translator")).await;
    let echo = TestNode::start(Host::new(Echo), &dir.path().join("echo")).await;
    let slow = TestNode::start(Host::new(Slow), &dir.path().join("slow")).await;

    let log = dir.path().join("chromedriver.log");
    let mut driver = Driver::spawn(&chromedriver, &log);
    let browser = Browser::start(&mut driver, &chromium, &dir.path().join("profile")).await;
    let started = began.elapsed();

    // The agent's info.
    browser.goto(&format!("{}/docs", translator.url)).await;
    browser
        .wait_for(
            "the agent's name",
            "return document.getElementById('agent-name').textContent;",
            json!([]),
            |v| v == "translator",
        )
        .await;
    assert_eq!(
        browser.text_of("#agent-address").await,
        translator.address.to_string()
    );
    assert!(browser.text_of("#agent-trust").await.contains("careful"));
    assert_eq!(
        browser.text_of("#agent-summary").await,
        Translator.summary().unwrap()
    );

    // The agent's own examples are offered; the first is the prompt's placeholder and
    // the prompt of the code snippets.
    let examples = Translator.examples();
    let shown = browser
        .script(
            "return Array.from(document.querySelectorAll('#examples button'), b => b.textContent);",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!(examples));
    let placeholder = browser
        .script(
            "return document.getElementById('prompt').placeholder;",
            json!([]),
        )
        .await;
    assert!(
        placeholder.as_str().unwrap().contains(&examples[0]),
        "{placeholder}"
    );
    let prompt_json = serde_json::to_string(&examples[0]).unwrap();
    assert!(browser.text_of("#api-ws").await.contains(&prompt_json));
    let curl = browser.text_of("#api-http").await;
    assert!(
        curl.contains("/input") && curl.contains("to Spanish"),
        "{curl}"
    );
    assert!(browser.text_of("#empty").await.contains("example"));

    // First turn: an example fills the prompt box, the Send button sends it.
    browser.click("#examples button").await;
    assert_eq!(browser.value_of("#prompt").await, examples[0]);
    browser.click("#send").await;
    let first = browser.reply(1).await;
    assert!(first.contains("Hola"), "{first}");
    assert_eq!(
        browser.value_of("#prompt").await,
        "",
        "the prompt box is cleared"
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("docs-page.png");
    browser.screenshot(&shot).await;

    // More turns on the same socket continue the session; Enter sends.
    browser
        .type_into("#prompt", "My name is John\u{E007}")
        .await;
    assert!(browser.reply(2).await.contains("John"));
    browser.type_into("#prompt", "What is my name?").await;
    browser.click("#send").await;
    let third = browser.reply(3).await;
    assert!(third.contains("John"), "{third}");
    let user_bubbles = browser
        .script(
            "return document.querySelectorAll('#messages .msg.user').length;",
            json!([]),
        )
        .await;
    assert_eq!(user_bubbles, 3);

    // A socket dropped between turns: the page reconnects on the next send and names
    // its session, so the conversation goes on.
    browser.drop_socket().await;
    browser.type_into("#prompt", "What is my name?").await;
    browser.click("#send").await;
    let fourth = browser.reply(4).await;
    assert!(fourth.contains("John"), "after a reconnect: {fourth}");

    // The sessions panel lists that one session; its details show the last turn.
    browser.click("#sessions-refresh").await;
    browser
        .wait_for(
            "the session list",
            "return document.querySelectorAll('#sessions li').length;",
            json!([]),
            |v| v.as_u64() >= Some(1),
        )
        .await;
    // The page's sessions are those of the secret it keeps; the node shows them to
    // nobody else.
    let (_, nobody) = translator.get("/sessions").await;
    assert_eq!(
        nobody["sessions"],
        json!([]),
        "unsigned readers without the secret"
    );
    let secret = browser
        .wait_for(
            "the page's session secret",
            "return localStorage.getItem('oonode.session_secret');",
            json!([]),
            |v| v.as_str().is_some_and(|s| s.len() == 64),
        )
        .await;
    let req = client()
        .get(format!("{}/sessions", translator.url))
        .header("x-co-session-secret", secret.as_str().unwrap());
    let (_, listed) = send(req).await;
    let ids: Vec<&str> = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["session_id"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "three turns on one socket are one session: {listed}"
    );
    assert!(browser.text_of("#sessions").await.contains(ids[0]));
    browser.click("#sessions li button").await;
    let detail = browser
        .wait_for(
            "the session's details",
            "return document.getElementById('session-detail').textContent;",
            json!([]),
            |v| v.as_str().is_some_and(|t| t.contains("Your name is John")),
        )
        .await;
    assert!(
        detail.as_str().unwrap().contains("What is my name?"),
        "{detail}"
    );
    // The details' button stays inside the sessions panel, also in a short window
    // (where the page scrolls rather than squeezing the panels).
    browser.resize(1024, 560).await;
    let fits = browser
        .script(
            "const b = document.querySelector('#session-detail .actions button');
             b.scrollIntoView({block: 'center'});
             const p = document.querySelector('aside.sessions').getBoundingClientRect();
             const r = b.getBoundingClientRect();
             return {
               fits: r.left >= p.left && r.right <= p.right && r.top >= p.top && r.bottom <= p.bottom,
               button: [r.left, r.top, r.right, r.bottom], panel: [p.left, p.top, p.right, p.bottom],
             };",
            json!([]),
        )
        .await;
    assert_eq!(fits["fits"], true, "{fits}");
    let sessions_shot = shot.with_file_name("docs-sessions.png");
    browser.screenshot(&sessions_shot).await;
    browser.resize(1280, 860).await;

    // A new conversation is a new socket and a new session.
    browser.click("#new-conversation").await;
    assert_eq!(browser.text_of("#messages").await, "");
    browser.type_into("#prompt", "What is my name?").await;
    browser.click("#send").await;
    let fresh = browser.reply(1).await;
    assert!(fresh.contains("haven't told me"), "{fresh}");

    // Streaming: the reply builds up chunk by chunk, then OUTPUT confirms it.
    browser.goto(&format!("{}/docs", slow.url)).await;
    browser
        .wait_for(
            "the slow agent's name",
            "return document.getElementById('agent-name').textContent;",
            json!([]),
            |v| v == "slow",
        )
        .await;
    let words = "one two three four five six";
    browser.type_into("#prompt", words).await;
    browser.click("#send").await;
    let partial_script = "const r = document.querySelector('#messages .reply');
        return r ? {cls: r.className, text: r.textContent} : null;";
    browser
        .wait_for(
            "a partial, streaming reply",
            partial_script,
            json!([]),
            |v| {
                v["cls"].as_str().is_some_and(|c| c.contains("streaming"))
                    && v["text"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("one") && t.len() < words.len())
            },
        )
        .await;
    assert_eq!(browser.reply(1).await, words);

    // A socket dropped mid-reply: the page reconnects and RESUMEs after the last chunk.
    let words = "alpha beta gamma delta epsilon zeta eta theta";
    browser.type_into("#prompt", words).await;
    browser.click("#send").await;
    browser
        .wait_for(
            "the second reply to start streaming",
            "const r = document.querySelectorAll('#messages .reply')[1];
             return r ? r.textContent : null;",
            json!([]),
            |v| v.as_str().is_some_and(|t| t.starts_with("alpha")),
        )
        .await;
    browser.drop_socket().await;
    assert_eq!(browser.reply(2).await, words, "resumed after a drop");

    // An ERROR shows its message and code.
    browser.type_into("#prompt", "please fail now").await;
    browser.click("#send").await;
    let (ok, error) = browser.outcome(3).await;
    assert!(!ok, "the run was meant to fail: {error}");
    assert!(
        error.contains("asked to fail") && error.contains("agent_error"),
        "{error}"
    );
    // The page takes the next prompt after an error.
    browser.type_into("#prompt", "still here").await;
    browser.click("#send").await;
    assert_eq!(browser.reply(4).await, "still here");

    // Files: attach one through the file input on the echo node's page.
    browser.goto(&format!("{}/docs", echo.url)).await;
    browser
        .wait_for(
            "the echo agent's name",
            "return document.getElementById('agent-name').textContent;",
            json!([]),
            |v| v == "echo",
        )
        .await;
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "hello from the browser\n").unwrap();
    browser.type_into("#files", file.to_str().unwrap()).await;
    browser
        .wait_for(
            "the attached file",
            "return document.getElementById('attachments').textContent;",
            json!([]),
            |v| v.as_str().is_some_and(|t| t.contains("notes.txt")),
        )
        .await;
    browser.type_into("#prompt", "Here is a file").await;
    browser.click("#send").await;
    let echoed = browser.reply(1).await;
    assert!(echoed.contains("files: notes.txt (23 bytes)"), "{echoed}");
    assert!(echoed.starts_with("Here is a file"), "{echoed}");
    assert_eq!(
        browser.text_of("#attachments").await,
        "",
        "attachments clear after sending"
    );
    assert!(browser
        .text_of("#messages .msg.user")
        .await
        .contains("notes.txt"));

    browser.close(&mut driver).await;
    drop(driver);
    translator.stop().await;
    echo.stop().await;
    slow.stop().await;
    println!(
        "browser test: {:.1?} in all, {:.1?} to start chromedriver and chromium; screenshots at {} and {}",
        began.elapsed(),
        started,
        shot.display(),
        sessions_shot.display()
    );
}
