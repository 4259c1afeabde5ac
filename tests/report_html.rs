//! `runner report --html`: the page is self-contained (no http(s) references, PNGs as data
//! URIs), has one row per run with its config, lists unfinished runs with escaped reasons, and
//! works in headless Chromium (scripts/check_report_html.sh, skipped with a note when node,
//! playwright-core or Chromium are missing unless RUNNER_REQUIRE_BROWSER=1, as .ci/run sets).
//! The checker itself must reject broken pages.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixture, run_dirs, runner, stderr};

/// A 1-epoch sweep of tests/fixtures/tiny_grid.toml (4 configs x 2 seeds) with one run marked
/// failed (a reason with markup in it), then `runner report --html`.
fn report_html(results: &Path) -> String {
    let o = runner(results)
        .args(["sweep", fixture("tiny_grid.toml").to_str().expect("utf8"), "--set", "train.max_epochs=1"])
        .output()
        .expect("sweep");
    assert!(o.status.success(), "{}", stderr(&o));
    let victim = &run_dirs(results, "tiny")[1];
    let status = std::fs::read_to_string(victim.join("status.toml")).expect("status");
    let failed = status.replace("status = \"finished\"", "status = \"failed\"\nreason = \"diverged <b>&amp; gone\"");
    std::fs::write(victim.join("status.toml"), failed).expect("write status");
    let o = runner(results).args(["report", "--html", "--samples", "4"]).output().expect("report");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("report.html"), "{}", stderr(&o));
    std::fs::read_to_string(results.join("tiny/report.html")).expect("report.html")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// The text of the element `<table ... id="ID">` up to its `</table>`.
fn table<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no table {id}"));
    let end = html[start..].find("</table>").expect("table end") + start;
    &html[start..end]
}

#[test]
fn html_report_is_self_contained_with_a_row_and_config_per_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let html = report_html(tmp.path());
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(!html.contains("http://") && !html.contains("https://"), "external reference in the page");

    let runs = run_dirs(tmp.path(), "tiny");
    assert_eq!(runs.len(), 8);
    // One body row per run in the runs table, one per configuration in the NLL table.
    assert_eq!(table(&html, "runs").matches("<tr>").count(), 1 + runs.len());
    assert_eq!(table(&html, "nll").matches("<tr>").count(), 1 + 4);
    assert!(table(&html, "nll").contains(">status</th>"));
    for d in &runs {
        let id = d.file_name().expect("name").to_string_lossy().to_string();
        assert!(table(&html, "runs").contains(&id), "no row for run {id}");
        let cfg = std::fs::read_to_string(d.join("config.toml")).expect("config");
        assert!(html.contains(&escape(&cfg)), "config of {id} not on the page");
    }

    // Images: every <img> is an embedded PNG (1 curve plot, 4 sample grids, 1 real-image grid).
    let imgs = html.matches("<img ").count();
    assert_eq!(imgs, html.matches("src=\"data:image/png;base64,iVBORw0KGgo").count(), "an image is not an embedded PNG");
    assert_eq!(imgs, 6, "curves + 4 sample grids + real images");

    // The failed run is listed with its reason, escaped; the raw markup never appears.
    let problems = table(&html, "problems");
    assert_eq!(problems.matches("<tr>").count(), 2, "{problems}");
    assert!(problems.contains("diverged &lt;b&gt;&amp;amp; gone"), "{problems}");
    assert!(problems.contains("st-failed"), "{problems}");
    assert!(!html.contains("<b>&amp; gone"));
    assert!(table(&html, "nll").contains("1 failed, 1 finished"));
}

fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// scripts/check_report_html.sh on `target`; None (after a note) when it skips for lack of a
/// browser, unless RUNNER_REQUIRE_BROWSER=1.
fn browser_check(target: &Path) -> Option<Output> {
    let o = Command::new("bash")
        .arg(root().join("scripts/check_report_html.sh"))
        .arg(target)
        .output()
        .expect("run check_report_html.sh");
    if o.status.code() == Some(77) {
        let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
        assert!(std::env::var("RUNNER_REQUIRE_BROWSER").as_deref() != Ok("1"), "browser check required: {why}");
        eprintln!("note: headless-browser check not run: {why}");
        return None;
    }
    Some(o)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn html_report_works_in_headless_chromium() {
    let tmp = tempfile::tempdir().expect("tempdir");
    report_html(tmp.path());
    let Some(o) = browser_check(&tmp.path().join("tiny")) else { return };
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("check_report_html: ok"), "{}", text(&o));
}

#[test]
fn browser_check_rejects_broken_pages() {
    let cases = [
        ("broken_report_js_error.html", "drawChart is not defined"),
        ("broken_report_no_sort.html", "did not sort ascending"),
    ];
    for (page, want) in cases {
        let Some(o) = browser_check(&fixture(page)) else { return };
        assert_eq!(o.status.code(), Some(1), "{page}: {}", text(&o));
        let out = text(&o);
        assert!(out.contains("check_report_html: FAIL") && out.contains(want), "{page}: {out}");
        assert_eq!(out.trim().lines().count(), 1, "{page}: not one line: {out}");
    }
}

#[test]
fn browser_check_exits_77_without_a_browser() {
    let o = Command::new("bash")
        .arg(root().join("scripts/check_report_html.sh"))
        .arg(fixture("broken_report_no_sort.html"))
        .env("CHROMIUM", "/nonexistent/chromium")
        .output()
        .expect("run check_report_html.sh");
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(text(&o).contains("skipped"), "{}", text(&o));
}
