//! `configs/lbd.service` against what lbd does: readiness by sd_notify, reload by SIGHUP, the
//! commands it runs exist in the binary, and `systemd-analyze verify` accepts it.
use std::path::Path;
use std::process::Command;

fn unit() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lbd.service");
    std::fs::read_to_string(&path).expect("read configs/lbd.service")
}

/// Every `key=value` line of the unit (comments and sections left out).
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn get<'a>(s: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    s.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn unit_matches_the_daemon() {
    let s = settings(&unit());
    assert_eq!(
        get(&s, "Type"),
        ["notify"],
        "lbd reports readiness by sd_notify"
    );
    // Reload = check the file (a bad one fails `systemctl reload`), then SIGHUP.
    assert_eq!(
        get(&s, "ExecReload"),
        [
            "/usr/local/bin/lbd check --config /etc/lbd/lb.toml",
            "/bin/kill -HUP $MAINPID"
        ]
    );
    assert_eq!(get(&s, "NoNewPrivileges"), ["yes"]);
    assert_eq!(get(&s, "ProtectSystem"), ["strict"]);
    assert_eq!(get(&s, "ProtectHome"), ["yes"]);
    assert_eq!(get(&s, "PrivateTmp"), ["yes"]);
    assert_ne!(
        get(&s, "User"),
        ["root"],
        "runs unprivileged, with capabilities"
    );
    let allowed = [
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_ADMIN",
        "CAP_BPF",
        "CAP_PERFMON",
    ];
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let caps: Vec<&str> = get(&s, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .collect();
        assert!(!caps.is_empty(), "{key} missing");
        for c in caps {
            assert!(allowed.contains(&c), "{key} grants {c}");
        }
    }

    // The commands the unit runs are the binary's real subcommands and flags: run them
    // against the example config.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lb.toml");
    let pre = get(&s, "ExecStartPre");
    assert_eq!(pre.len(), 1, "{pre:?}");
    let args: Vec<&str> = pre[0].split_whitespace().skip(1).collect();
    assert_eq!(args, ["check", "--config", "/etc/lbd/lb.toml"]);
    let out = Command::new(env!("CARGO_BIN_EXE_lbd"))
        .args(&args[..2])
        .arg(&example)
        .output()
        .expect("run lbd check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        get(&s, "ExecStart"),
        ["/usr/local/bin/lbd run --config /etc/lbd/lb.toml"]
    );
}

#[test]
fn systemd_analyze_verify_is_clean() {
    let Ok(v) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("SKIP: systemd-analyze not installed");
        return;
    };
    assert!(v.status.success());
    // verify checks that ExecStart binaries exist; point them at this build.
    let dir = std::env::temp_dir().join(format!("lbd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("lbd.service");
    std::fs::write(
        &path,
        unit().replace("/usr/local/bin/lbd", env!("CARGO_BIN_EXE_lbd")),
    )
    .expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}
