//! `lbd check` as an operator runs it: the real binary, real files, exit codes and output.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lbd_check(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lbd"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("run lbd")
}

/// A file in the temp dir, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("lbd-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write temp config");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn example_config_is_ok() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lb.toml");
    let out = lbd_check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(": ok (1 listeners, 3 routes, 2 clusters, 5 endpoints, 0 vips)"),
        "{stdout}"
    );
}

#[test]
fn broken_config_lists_every_error_and_exits_1() {
    let file = TempFile::new(
        "broken.toml",
        r#"[[listeners]]
name = "a"
bind = "127.0.0.1:8080"

[[clusters]]
name = "c"
[[clusters.endpoints]]
address = "127.0.0.1:9001"
weight = 0

[[routes]]
name = "r"
cluster = "nope"
"#,
    );
    let out = lbd_check(&file.0);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown = file.0.display();
    let want = [
        format!("{shown}:9:10: clusters[0].endpoints[0].weight: must be between 1 and 1000"),
        format!("{shown}:13:11: routes[0].cluster: unknown cluster \"nope\""),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    for (line, want) in lines.iter().zip(&want) {
        assert!(
            line.starts_with(want.as_str()),
            "want {want}\nstderr:\n{stderr}"
        );
    }
    assert!(lines.len() >= want.len(), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
}

#[test]
fn syntax_error_has_line_and_column() {
    let file = TempFile::new("syntax.toml", "[global]\nlog_level = \"info\n");
    let out = lbd_check(&file.0);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{}:2:", file.0.display());
    assert!(stderr.starts_with(&prefix), "{stderr}");
    assert!(stderr.contains("TOML syntax"), "{stderr}");
}

#[test]
fn missing_file_fails() {
    let out = lbd_check(Path::new("/nonexistent/lbd/lb.toml"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/lbd/lb.toml: cannot read"),
        "{stderr}"
    );
}
