//! The README's quick start, run as written: `lbd demo` (real process, its own demo backends,
//! `configs/demo.toml`), then every `$ command` of the README's demo transcript through `sh`,
//! each output compared line by line with the output pasted under it. A README whose
//! transcript no longer matches what lbd answers fails here.
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Addresses `configs/demo.toml` and the demo backends use.
const DEMO_ADDRS: &[&str] = &[
    "127.0.0.1:8080",
    "127.0.0.1:9901",
    "127.0.0.1:9101",
    "127.0.0.1:9102",
    "127.0.0.1:9103",
    "127.0.0.1:9201",
    "127.0.0.1:9202",
];
const ADMIN: &str = "127.0.0.1:9901";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One `$ command` of the transcript and the lines printed under it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The steps between the README's `<!-- demo-transcript:start -->` and `:end` markers.
fn transcript(readme: &str) -> Vec<Step> {
    let start = readme
        .find("<!-- demo-transcript:start -->")
        .expect("README has a demo-transcript:start marker");
    let end = readme[start..]
        .find("<!-- demo-transcript:end -->")
        .expect("README has a demo-transcript:end marker")
        + start;
    let mut steps: Vec<Step> = Vec::new();
    for line in readme[start..end].lines().skip(1) {
        if line.starts_with("```") {
            continue;
        }
        if let Some(cmd) = line.strip_prefix("$ ") {
            steps.push(Step {
                command: cmd.to_owned(),
                expected: Vec::new(),
            });
        } else if let Some(step) = steps.last_mut() {
            step.expected.push(line.trim_end().to_owned());
        }
    }
    for s in &mut steps {
        while s.expected.last().is_some_and(String::is_empty) {
            s.expected.pop();
        }
    }
    steps
}

/// `GET path` on the admin API with a plain HTTP/1.0 request; the body, or `None`.
fn admin_get(path: &str) -> Option<String> {
    let addr: SocketAddr = ADMIN.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {ADMIN}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// The demo process, killed (by its pid) when dropped.
struct Demo {
    child: Child,
    log: PathBuf,
}

impl Demo {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- lbd demo logs ----\n{}", self.logs());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn curl_missing() -> bool {
    !Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn readme_quick_start_transcript_matches_lbd_demo() {
    if curl_missing() {
        println!("SKIP: curl not installed (scripts/setup.sh installs it)");
        return;
    }
    // The demo uses fixed, documented ports; another program on one of them is not lbd's fault.
    if let Some(busy) = DEMO_ADDRS
        .iter()
        .find(|a| TcpListener::bind(a.parse::<SocketAddr>().expect("addr")).is_err())
    {
        println!("SKIP: {busy} is in use by another program; the demo needs it");
        return;
    }
    let readme = std::fs::read_to_string(root().join("README.md")).expect("read README.md");
    let steps = transcript(&readme);
    assert!(
        steps.len() >= 5 && steps.iter().all(|s| !s.expected.is_empty()),
        "the README's demo transcript has commands with their output: {steps:#?}"
    );

    let log = std::env::temp_dir().join(format!("lbd-demo-{}.log", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_lbd"))
        .args(["demo", "--config", "configs/demo.toml"])
        .current_dir(root())
        .env("RUST_LOG", "info,lbd::access=off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn lbd demo");
    let mut demo = Demo { child, log };

    // The README says web-3 is out once its health check failed; wait for exactly that.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = demo.child.try_wait() {
            panic!("lbd demo exited ({status}); logs:\n{}", demo.logs());
        }
        let clusters = admin_get("/clusters").unwrap_or_default();
        let web3_down = clusters
            .split("\"address\"")
            .any(|ep| ep.contains("127.0.0.1:9103") && ep.contains("\"health\": \"unhealthy\""));
        if web3_down {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web-3 not taken out within 20 s; /clusters: {clusters}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        demo.logs()
            .contains("lbd demo: backends web-1 127.0.0.1:9101"),
        "the demo names its backends: {}",
        demo.logs()
    );

    let mut actual_transcript = String::new();
    let mut mismatches = Vec::new();
    for step in &steps {
        let out = Command::new("sh")
            .arg("-c")
            .arg(&step.command)
            .current_dir(root())
            .stdin(Stdio::null())
            .output()
            .expect("run sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut got: Vec<String> = stdout.lines().map(|l| l.trim_end().to_owned()).collect();
        while got.last().is_some_and(String::is_empty) {
            got.pop();
        }
        actual_transcript.push_str(&format!("$ {}\n{}\n", step.command, got.join("\n")));
        if got != step.expected {
            mismatches.push(format!(
                "$ {}\n  README: {:?}\n  actual: {:?}",
                step.command, step.expected, got
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "README transcript differs from what lbd demo answers:\n{}\n\nactual transcript:\n{actual_transcript}",
        mismatches.join("\n")
    );
}
