//! The Debian package `cargo xtask deb` builds (its code is compiled in here, packaging this
//! test build of lbd) checked with dpkg-deb: contents, modes, control fields, conffiles,
//! maintainer scripts, the packaged unit (systemd-analyze verify), the packaged binary and
//! config; and the man pages and completions lbd generates from its clap definitions. In CI
//! (or with LBD_TEST_INSTALL_DEB=1), as root on a machine without lbd installed, the package is
//! also installed with dpkg -i, its effects checked, and purged again.
#![allow(
    dead_code,
    reason = "xtask's deb module is shared; the test uses part of it"
)]

#[path = "../../xtask/src/deb.rs"]
mod deb;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn lbd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command; stdout, or a panic with its stderr.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn completions_and_man_pages_come_from_the_clap_definitions() {
    let subcommands = [
        "run",
        "check",
        "explain",
        "decap",
        "demo",
        "completions",
        "man",
        "import",
    ];
    let bash = run(Command::new(lbd()).args(["completions", "bash"]));
    assert!(bash.contains("complete -F _lbd"), "{bash}");
    let zsh = run(Command::new(lbd()).args(["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef lbd"), "{zsh}");
    let fish = run(Command::new(lbd()).args(["completions", "fish"]));
    for s in subcommands {
        assert!(
            bash.contains(s) && zsh.contains(s),
            "completions know `{s}`"
        );
        assert!(
            fish.contains(&format!("-a \"{s}\"")),
            "fish completes `{s}`"
        );
    }
    // The --config flag of `lbd check` completes (taken from clap, not written by hand).
    assert!(bash.contains("--config"), "{bash}");
    let bad = Command::new(lbd())
        .args(["completions", "tcsh"])
        .output()
        .expect("run lbd");
    assert!(!bad.status.success(), "an unknown shell is refused");

    let page = run(Command::new(lbd()).arg("man"));
    assert!(page.contains(".TH lbd 1"), "{page}");
    assert!(
        page.contains("/etc/lbd/lb.toml"),
        "the description names the config"
    );
    for s in subcommands {
        assert!(
            page.contains(&format!("lbd\\-{s}(1)")),
            "man page lists {s}"
        );
    }
    let dir = std::env::temp_dir().join(format!("lbd-man-{}", std::process::id()));
    run(Command::new(lbd()).arg("man").arg("--out-dir").arg(&dir));
    let check = std::fs::read_to_string(dir.join("lbd-check.1")).expect("lbd-check.1");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(check.contains("\\-\\-config"), "{check}");
    if have("man", "--version") {
        // man renders it without warnings (groff's -ww through man's own checker).
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{} man | man -l -Tutf8 - 2>&1 >/dev/null",
                lbd().display()
            ))
            .output()
            .expect("run man");
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "man -l warnings: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn deb_package_holds_binary_unit_conffile_user_scripts_man_and_completions() {
    if !have("dpkg-deb", "--version") {
        println!("SKIP: dpkg-deb not installed (not a Debian system)");
        return;
    }
    let scratch = Scratch(std::env::temp_dir().join(format!("lbd-deb-{}", std::process::id())));
    let out_dir = scratch.0.clone();
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let deb = deb::build(&deb::DebOptions {
        root: root(),
        lbd: lbd().to_path_buf(),
        out_dir: out_dir.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        fast: true,
    })
    .unwrap_or_else(|e| panic!("building the package: {e:#}"));
    let arch = deb::architecture().expect("architecture");
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(format!("lbd_{}_{arch}.deb", env!("CARGO_PKG_VERSION")).as_str())
    );

    // Contents: path → (mode, owner).
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let entry = |path: &str| -> (String, String) {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{listing}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[0].to_owned(), f[1].to_owned())
    };
    assert_eq!(
        entry("/usr/bin/lbd"),
        ("-rwxr-xr-x".into(), "root/root".into())
    );
    assert_eq!(
        entry("/etc/lbd/lb.toml"),
        ("-rw-r-----".into(), "root/root".into())
    );
    assert_eq!(entry("/lib/systemd/system/lbd.service").0, "-rw-r--r--");
    for path in [
        "/usr/share/man/man1/lbd.1.gz",
        "/usr/share/man/man1/lbd-run.1.gz",
        "/usr/share/man/man1/lbd-check.1.gz",
        "/usr/share/bash-completion/completions/lbd",
        "/usr/share/zsh/vendor-completions/_lbd",
        "/usr/share/fish/vendor_completions.d/lbd.fish",
        "/usr/share/doc/lbd/copyright",
        "/usr/share/doc/lbd/README.md.gz",
        "/usr/share/doc/lbd/examples/lbd-rules.yml",
        "/usr/share/doc/lbd/examples/lbd-dashboard.json",
    ] {
        entry(path);
    }
    assert!(
        !listing.contains("/usr/local"),
        "a package installs nothing under /usr/local:\n{listing}"
    );

    // Control fields, conffiles, maintainer scripts.
    let field = |name: &str| {
        run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "lbd");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Architecture"), arch);
    assert!(
        field("Depends").contains("adduser"),
        "postinst uses adduser"
    );
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for member in [
        "conffiles",
        "control",
        "md5sums",
        "postinst",
        "prerm",
        "postrm",
    ] {
        assert!(
            info.contains(member),
            "{member} in the control area:\n{info}"
        );
    }
    let conffiles = run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/lbd/lb.toml");
    let control = out_dir.join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh").arg("-n").arg(control.join(script)));
    }
    let postinst = std::fs::read_to_string(control.join("postinst")).expect("postinst");
    assert!(
        postinst.contains("adduser --system")
            && postinst.contains("chown root:lbd /etc/lbd/lb.toml"),
        "{postinst}"
    );

    // The files themselves: the binary runs and accepts the packaged config; the unit uses
    // the packaged paths, checks before reloading, and systemd-analyze accepts it.
    let tree = out_dir.join("tree");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree));
    let bin = tree.join("usr/bin/lbd");
    assert!(run(Command::new(&bin).arg("version")).starts_with("lbd "));
    run(Command::new(&bin)
        .args(["check", "--config"])
        .arg(tree.join("etc/lbd/lb.toml")));
    let unit = std::fs::read_to_string(tree.join("lib/systemd/system/lbd.service")).expect("unit");
    assert!(!unit.contains("/usr/local"), "{unit}");
    assert!(unit.contains("ExecStart=/usr/bin/lbd run --config /etc/lbd/lb.toml"));
    assert!(unit.contains("ExecReload=/usr/bin/lbd check --config /etc/lbd/lb.toml"));
    assert!(unit.contains("User=lbd"));
    if have("systemd-analyze", "--version") {
        let verify = out_dir.join("lbd.service");
        std::fs::write(
            &verify,
            unit.replace("/usr/bin/lbd", &bin.display().to_string()),
        )
        .expect("write unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&verify)
            .output()
            .expect("systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify: {stderr}"
        );
    } else {
        println!("SKIP: systemd-analyze not installed; packaged unit not verified");
    }

    install_and_purge(&deb);
}

/// `dpkg -i` then `dpkg --purge`, only where that is safe to do to the machine: CI or an
/// explicit opt-in, root, and no lbd package, binary or user there before.
fn install_and_purge(deb: &Path) {
    let opted_in =
        std::env::var_os("CI").is_some() || std::env::var_os("LBD_TEST_INSTALL_DEB").is_some();
    if !opted_in {
        println!("SKIP: dpkg -i not tried (runs in CI, or set LBD_TEST_INSTALL_DEB=1)");
        return;
    }
    let root_user = run(Command::new("id").arg("-u")).trim() == "0";
    let installed = have("dpkg", "--version")
        && Command::new("dpkg")
            .args(["-s", "lbd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let user_existed = Command::new("getent")
        .args(["passwd", "lbd"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !root_user || installed || user_existed || Path::new("/usr/bin/lbd").exists() {
        println!(
            "SKIP: dpkg -i not tried (root: {root_user}, lbd package installed: {installed}, \
             lbd user exists: {user_existed}, /usr/bin/lbd exists: {})",
            Path::new("/usr/bin/lbd").exists()
        );
        return;
    }
    /// Purges the package and the user it created, also when an assertion fails.
    struct Installed;
    impl Drop for Installed {
        fn drop(&mut self) {
            let _ = Command::new("dpkg").args(["--purge", "lbd"]).status();
            let _ = Command::new("deluser")
                .args(["--system", "--quiet", "lbd"])
                .status();
            let _ = Command::new("delgroup")
                .args(["--system", "--quiet", "lbd"])
                .status();
        }
    }
    run(Command::new("dpkg").arg("-i").arg(deb));
    let guard = Installed;
    let passwd = run(Command::new("getent").args(["passwd", "lbd"]));
    assert!(
        passwd.contains("/usr/sbin/nologin"),
        "system user: {passwd}"
    );
    let stat = run(Command::new("stat").args(["-c", "%a %U:%G", "/etc/lbd/lb.toml", "/etc/lbd"]));
    assert_eq!(stat, "640 root:lbd\n750 root:lbd\n");
    // The unit's ExecStartPre / ExecReload as the unit runs them: as user lbd.
    run(Command::new("runuser").args([
        "-u",
        "lbd",
        "--",
        "/usr/bin/lbd",
        "check",
        "--config",
        "/etc/lbd/lb.toml",
    ]));
    let files = run(Command::new("dpkg").args(["-L", "lbd"]));
    assert!(files.contains("/usr/share/man/man1/lbd.1.gz"), "{files}");
    if Path::new("/run/systemd/system").exists() {
        let active = Command::new("systemctl")
            .args(["is-active", "lbd"])
            .output()
            .expect("systemctl");
        assert_eq!(
            String::from_utf8_lossy(&active.stdout).trim(),
            "active",
            "postinst started the service"
        );
        // The packaged config's admin address answers.
        let status = run(Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--retry",
            "5",
            "--retry-connrefused",
            "http://127.0.0.1:9901/status",
        ]));
        assert_eq!(
            status, "200",
            "the installed service answers on its admin address"
        );
    } else {
        println!("SKIP: systemd is not running here; the service start was not checked");
    }
    drop(guard);
    assert!(
        !Path::new("/usr/bin/lbd").exists(),
        "purge removed the binary"
    );
    assert!(
        !Path::new("/etc/lbd/lb.toml").exists(),
        "purge removed the conffile"
    );
}
