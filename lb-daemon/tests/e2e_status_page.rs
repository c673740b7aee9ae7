//! The admin status page rendered by a real browser (headless Chromium): its script must fetch
//! `/status` and `/clusters` and draw every cluster, endpoint and health state. A screenshot is
//! left in `target/test-artifacts/status-page.png` for people to look at.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lb_tests::client::H1;
use lb_tests::{Backend, Lbd, closed_addr, free_addr};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lbd"))
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        let ok = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| PathBuf::from(name))
    })
}

/// Runs headless Chromium on `url` with `args` (≤ 90 s) and returns its stdout.
fn run_chromium(browser: &Path, profile: &Path, url: &str, args: &[String]) -> String {
    let out_path = profile.with_extension("stdout");
    let out = std::fs::File::create(&out_path).expect("stdout file");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().expect("wait chromium") {
            assert!(status.success(), "chromium {args:?} exited with {status}");
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::read_to_string(&out_path).expect("read chromium stdout")
}

fn config(listen: SocketAddr, admin: SocketAddr, web: &[SocketAddr], api: &[SocketAddr]) -> String {
    let eps = |v: &[SocketAddr]| -> String {
        v.iter()
            .map(|a| format!("\n[[clusters.endpoints]]\naddress = \"{a}\"\n"))
            .collect()
    };
    format!(
        r#"[global]
access_log = false

[admin]
bind = "{admin}"

[[listeners]]
name = "public"
bind = "{listen}"

[[routes]]
name = "api"
cluster = "api"
[routes.match]
path_prefix = "/api"

[[routes]]
name = "all"
cluster = "web"

[[clusters]]
name = "web"
{web}
[[clusters]]
name = "api"
policy = "least_request"

[clusters.health_check]
kind = "tcp"
interval = "300ms"
timeout = "250ms"
unhealthy_threshold = 1
{api}"#,
        web = eps(web),
        api = eps(api),
    )
}

/// The `<tr>` of the DOM that shows `address`.
fn row<'a>(dom: &'a str, address: &str) -> &'a str {
    dom.split("<tr")
        .find(|r| r.contains(&format!(">{address}")))
        .unwrap_or_else(|| panic!("no row for {address} in the rendered page:\n{dom}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_clusters_and_health_in_chromium() {
    let Some(browser) = chromium() else {
        println!("SKIP: chromium not installed");
        return;
    };
    let (w1, w2, a1) = (
        Backend::start("w1").await,
        Backend::start("w2").await,
        Backend::start("a1").await,
    );
    let down = closed_addr();
    let (listen, admin) = (free_addr(), free_addr());
    let lbd = Lbd::start(
        bin(),
        &config(listen, admin, &[w1.addr, w2.addr], &[a1.addr, down]),
    );
    let client = H1::new();
    for i in 0..40 {
        let path = if i % 2 == 0 { "/" } else { "/api/x" };
        let r = client.get(listen, path, None).await.expect("request");
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let r = client
        .send(
            admin,
            Request::post(format!("/clusters/web/endpoints/{}/drain", w2.addr))
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("drain");
    assert_eq!(r.status, 200, "{}", r.text());
    // The closed endpoint must be down before the page is drawn.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client
            .get(admin, "/clusters", None)
            .await
            .expect("clusters");
        if r.text().contains("\"unhealthy\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{down} never went down: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("create target/test-artifacts");
    let screenshot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let profile = std::env::temp_dir().join(format!("lbd-chromium-{}", std::process::id()));
    let url = format!("http://{admin}/");
    let dom = tokio::task::block_in_place(|| {
        run_chromium(
            &browser,
            &profile,
            &url,
            &[format!("--screenshot={}", screenshot.display())],
        );
        run_chromium(&browser, &profile, &url, &["--dump-dom".to_owned()])
    });
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_file(profile.with_extension("stdout"));

    let png = std::fs::read(&screenshot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot is not a real PNG ({} bytes)",
        png.len()
    );
    println!("status page screenshot: {}", screenshot.display());

    // The script's own text holds these strings too; only the elements' contents count.
    assert!(
        dom.contains("<div id=\"error\"></div>"),
        "page could not fetch the API:\n{dom}"
    );
    assert!(
        !dom.contains("<div id=\"meta\">loading…"),
        "page never filled in:\n{dom}"
    );
    for name in [
        "Cluster web",
        "Cluster api",
        "least_request",
        "public",
        &listen.to_string(),
    ] {
        assert!(
            dom.contains(name),
            "{name:?} missing from the rendered page:\n{dom}"
        );
    }
    for (addr, health) in [
        (w1.addr, "healthy"),
        (w2.addr, "drained"),
        (a1.addr, "healthy"),
        (down, "unhealthy"),
    ] {
        let r = row(&dom, &addr.to_string());
        assert!(
            r.contains(&format!("class=\"{health}\">{health}<")),
            "{addr} not shown as {health}: {r}"
        );
    }
    drop(lbd);
}
