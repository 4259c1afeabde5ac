//! `runner report --html`: one self-contained `report.html` beside `report.md`. No network: the
//! CSS and the script are inline and the PNGs (validation curves, sample grids, a grid of real
//! test images per data set) are embedded as base64 data URIs, so the file can be mailed or
//! opened from an archive. The page holds the NLL table (the text table's rows and columns plus
//! the runs' statuses), every run that did not finish with its reason, and one row per run with
//! its resolved `config.toml` behind a click. Every table sorts by any column on a click on its
//! header (numbers numerically, a second click reverses; missing values stay last).
//! `scripts/check_report_html.sh` tests the page in headless Chromium.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine as _;

use crate::report::{self, Group, Table};
use crate::store;
use crate::summary::{self, Row};

/// What the report already computed, for the page.
pub struct Input<'a> {
    pub exp_dirs: &'a [PathBuf],
    pub out_dir: &'a Path,
    pub groups: &'a [Group],
    pub table: &'a Table,
    pub curves: &'a [PathBuf],
    pub samples: &'a [PathBuf],
    /// Images in each real-image grid.
    pub n_real: usize,
}

/// Writes `report.html` in the out folder; returns its path.
pub fn write(input: &Input) -> Result<PathBuf> {
    let real = write_real_grids(input);
    let html = page(input, &real)?;
    let path = input.out_dir.join("report.html");
    store::atomic_write(&path, html.as_bytes())?;
    Ok(path)
}

/// Text safe inside HTML elements and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The number a cell sorts by: its leading number ("3.21 ± 0.04" -> 3.21, "[3.1, 3.3]" -> 3.1,
/// "2/2" -> 2); None for text, for "-" and for words that start with digits ("3a9f").
pub fn sort_key(cell: &str) -> Option<f64> {
    let s = cell.trim().trim_start_matches('[').trim_start();
    let end = s.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c))).unwrap_or(s.len());
    let (head, rest) = s.split_at(end);
    let ends_well = rest.is_empty() || rest.starts_with(|c: char| c.is_whitespace() || "/,]%".contains(c));
    if !ends_well || !head.starts_with(|c: char| c.is_ascii_digit() || "+-.".contains(c)) {
        return None;
    }
    head.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A column is numeric when some cell has a number and every other cell is empty or "-".
fn numeric_column(cells: &[&str]) -> bool {
    let missing = |c: &str| matches!(c.trim(), "" | "-" | "*");
    cells.iter().any(|c| sort_key(c).is_some()) && cells.iter().all(|c| sort_key(c).is_some() || missing(c))
}

/// A cell of plain text: escaped, with its sort key when it has one.
fn td(text: &str) -> String {
    match sort_key(text) {
        Some(v) => format!("<td data-v=\"{v}\">{}</td>", escape(text)),
        None => format!("<td>{}</td>", escape(text)),
    }
}

/// A sortable table: `header`, and rows of ready-made `<td>` cells whose plain text is `texts`
/// (used to decide which columns are numeric).
fn sortable(id: &str, header: &[String], texts: &[Vec<String>], cells: &[Vec<String>]) -> String {
    let mut s = format!("<table class=\"sortable\" id=\"{}\">\n<thead><tr>", escape(id));
    for (i, h) in header.iter().enumerate() {
        let col: Vec<&str> = texts.iter().map(|r| r.get(i).map_or("", String::as_str)).collect();
        let kind = if numeric_column(&col) { "num" } else { "text" };
        let _ = write!(s, "<th data-type=\"{kind}\" title=\"sort\">{}</th>", escape(h));
    }
    s.push_str("</tr></thead>\n<tbody>\n");
    for r in cells {
        let _ = writeln!(s, "<tr>{}</tr>", r.concat());
    }
    s.push_str("</tbody></table>\n");
    s
}

/// "finished", or counts by status ("1 finished, 1 failed") when a group's runs differ.
fn group_status(runs: &[Row]) -> String {
    let counts = summary::counts(runs);
    if counts.len() == 1 {
        return counts.keys().next().map(|k| k.to_string()).unwrap_or_default();
    }
    counts.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}

/// The text table's rows with a status column added.
fn nll_section(input: &Input) -> String {
    let mut header = input.table.header.clone();
    header.push("status".into());
    let texts: Vec<Vec<String>> = input
        .table
        .rows
        .iter()
        .zip(input.groups)
        .map(|(r, g)| r.iter().cloned().chain([group_status(&g.runs)]).collect())
        .collect();
    let cells: Vec<Vec<String>> = texts
        .iter()
        .map(|r| {
            let (last, rest) = r.split_last().expect("status column");
            rest.iter().map(|c| td(c)).chain([status_td(last)]).collect()
        })
        .collect();
    let mut s = String::from("<h2 id=\"sec-nll\">NLL by configuration</h2>\n");
    s.push_str(&sortable("nll", &header, &texts, &cells));
    let _ = writeln!(s, "<p class=\"note\">* best mean test NLL; {}</p>", escape(report::FOOTNOTE));
    s
}

/// A status cell, styled by its name (any name: statuses added later show as text).
fn status_td(status: &str) -> String {
    let class: String = status.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    format!("<td class=\"status st-{class}\">{}</td>", escape(status))
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.prec$}"))
}

/// Every run that did not finish, with its status and reason.
fn problems_section(input: &Input) -> String {
    let bad: Vec<&Row> = input.groups.iter().flat_map(|g| &g.runs).filter(|r| !r.status.is_finished()).collect();
    let mut s = format!("<h2 id=\"sec-problems\">Runs not finished ({})</h2>\n", bad.len());
    if bad.is_empty() {
        s.push_str("<p>Every run finished.</p>\n");
        return s;
    }
    let header: Vec<String> =
        ["experiment", "config", "seed", "run", "status", "reason", "epochs"].map(String::from).to_vec();
    let texts: Vec<Vec<String>> = bad
        .iter()
        .map(|r| {
            let reason = r.status.reason.clone().unwrap_or_default();
            let (seed, epochs) = (r.config.seed.to_string(), r.status.epochs.to_string());
            vec![r.experiment.clone(), r.grid_label(), seed, r.run_id.clone(), r.status.status.to_string(), reason, epochs]
        })
        .collect();
    let cells = texts
        .iter()
        .map(|t| t.iter().enumerate().map(|(i, c)| if i == 4 { status_td(c) } else { td(c) }).collect())
        .collect::<Vec<Vec<String>>>();
    s.push_str(&sortable("problems", &header, &texts, &cells));
    s
}

/// One row per run: its numbers, status and the resolved config.toml behind a click.
fn runs_section(input: &Input) -> String {
    let header: Vec<String> = ["experiment", "config", "seed", "run", "status", "test NLL", "best val NLL", "epochs"]
        .into_iter()
        .chain(["seconds", "config.toml"])
        .map(String::from)
        .collect();
    let runs: Vec<&Row> = input.groups.iter().flat_map(|g| &g.runs).collect();
    let texts: Vec<Vec<String>> = runs.iter().map(|r| run_texts(r)).collect();
    let cells: Vec<Vec<String>> = runs
        .iter()
        .zip(&texts)
        .map(|(r, t)| {
            let mut c: Vec<String> =
                t.iter().enumerate().map(|(i, c)| if i == 4 { status_td(c) } else { td(c) }).collect();
            c.push(config_td(input.exp_dirs, r));
            c
        })
        .collect();
    let mut s = format!("<h2 id=\"sec-runs\">Runs ({})</h2>\n", runs.len());
    s.push_str(&sortable("runs", &header, &texts, &cells));
    s
}

fn run_texts(r: &Row) -> Vec<String> {
    let st = &r.status;
    vec![
        r.experiment.clone(),
        r.grid_label(),
        r.config.seed.to_string(),
        r.run_id.clone(),
        st.status.to_string(),
        opt(st.test_nll, 3),
        opt(st.best_val_nll, 3),
        st.epochs.to_string(),
        format!("{:.1}", st.wall_seconds),
    ]
}

/// The run's config.toml as written, in a <details> opened by a click.
fn config_td(exp_dirs: &[PathBuf], r: &Row) -> String {
    let path = report::results_run_dir(exp_dirs, r).join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("# {}: cannot read: {e}", path.display()));
    format!(
        "<td class=\"cfg\"><details><summary>config.toml</summary><pre class=\"config\">{}</pre></details></td>",
        escape(&text)
    )
}

/// An embedded PNG with a caption.
fn figure(path: &Path, alt: &str) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    Ok(format!(
        "<figure><img alt=\"{}\" src=\"data:image/png;base64,{b64}\"><figcaption>{}</figcaption></figure>\n",
        escape(alt),
        escape(&name)
    ))
}

fn figures_section(id: &str, title: &str, alt: &str, files: &[PathBuf]) -> Result<String> {
    let mut s = format!("<h2 id=\"sec-{}\">{}</h2>\n", escape(id), escape(title));
    if files.is_empty() {
        s.push_str("<p>None (no finished run to draw from).</p>\n");
    }
    s.push_str("<div class=\"figures\">\n");
    for f in files {
        s.push_str(&figure(f, alt)?);
    }
    s.push_str("</div>\n");
    Ok(s)
}

/// `real_<data>.png` in the out folder: the first test images of each data set the runs use.
/// A data set that does not load is reported and skipped: the page is still written.
fn write_real_grids(input: &Input) -> Vec<PathBuf> {
    let mut sets = BTreeMap::new();
    for r in input.groups.iter().flat_map(|g| &g.runs) {
        sets.entry(report::data_key(&r.config.data)).or_insert_with(|| r.config.data.clone());
    }
    let mut files = vec![];
    for (key, cfg) in sets {
        let path = input.out_dir.join(format!("real_{key}.png"));
        match real_grid(&path, &key, &cfg, input.n_real) {
            Ok(()) => files.push(path),
            Err(e) => tracing::warn!("real images of {key}: {e:#}"),
        }
    }
    files
}

fn real_grid(path: &Path, key: &str, cfg: &crate::config::DataConfig, n: usize) -> Result<()> {
    let data = crate::data::load(cfg)?;
    let split = &data.test;
    let images: Vec<Vec<u8>> =
        split.pixels.chunks(split.dims).take(n.min(split.n)).map(<[u8]>::to_vec).collect();
    let title = format!("{key}: real test images");
    crate::plots::sample_grid(path, &title, &images, (data.height, data.width), data.levels)
}

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; cursor: pointer; user-select: none; white-space: nowrap; }
th:hover { background: #e0e6f0; }
th[aria-sort="ascending"]::after { content: " \25B2"; }
th[aria-sort="descending"]::after { content: " \25BC"; }
td[data-v] { font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
.status { font-weight: 600; }
.st-finished { color: #17662a; }
.st-failed { color: #b00020; }
.st-pruned, .st-interrupted, .st-stale { color: #a05a00; }
.st-running, .st-unfinished { color: #1a4fa0; }
summary { cursor: pointer; color: #1a4fa0; }
pre.config { background: #f6f6f6; padding: 0.5em; margin: 0.3em 0; font-size: 0.85em; max-width: 60em; overflow-x: auto; }
.note { color: #555; font-size: 0.9em; }
nav { margin-bottom: 1em; }
nav a { color: #1a4fa0; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #ddd; image-rendering: pixelated; }
figcaption { color: #555; font-size: 0.85em; }
"#;

/// Click a header to sort its table; numbers by `data-v`, missing values last either way.
const SCRIPT: &str = r#"
(function () {
  "use strict";
  function compare(a, b, numeric, dir) {
    if (numeric) {
      var x = parseFloat(a.getAttribute("data-v")), y = parseFloat(b.getAttribute("data-v"));
      if (isNaN(x) || isNaN(y)) { return (isNaN(x) ? 1 : 0) - (isNaN(y) ? 1 : 0); }
      return dir * (x - y);
    }
    return dir * a.textContent.localeCompare(b.textContent, undefined, { numeric: true });
  }
  function sortBy(table, th, col) {
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var numeric = th.getAttribute("data-type") === "num";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r, s) { return compare(r.cells[col], s.cells[col], numeric, dir); });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("thead th").forEach(function (th, col) {
      th.addEventListener("click", function () { sortBy(table, th, col); });
    });
  });
})();
"#;

const NAV: &str = "<nav><a href=\"#sec-nll\">NLL table</a> · <a href=\"#sec-problems\">not finished</a> · \
    <a href=\"#sec-curves\">curves</a> · <a href=\"#sec-samples\">samples</a> · <a href=\"#sec-real\">real images</a> · \
    <a href=\"#sec-runs\">runs and configs</a></nav>";

fn head(title: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(title)
    )
}

/// The whole page.
fn page(input: &Input, real: &[PathBuf]) -> Result<String> {
    let names: Vec<String> = input.exp_dirs.iter().map(|d| d.display().to_string()).collect();
    let mut s = head(&format!("NLL report: {}", names.join(", ")));
    let _ = writeln!(s, "<h1>NLL report</h1>\n<p>Experiments: {}</p>\n{NAV}", escape(&names.join(", ")));
    s.push_str(&nll_section(input));
    s.push_str(&problems_section(input));
    s.push_str(&figures_section("curves", "Validation NLL", "validation NLL per epoch", input.curves)?);
    let samples = "Samples (best seed of each configuration)";
    s.push_str(&figures_section("samples", samples, "sample grid", input.samples)?);
    s.push_str(&figures_section("real", "Real images", "real test images", real)?);
    s.push_str(&runs_section(input));
    let _ = write!(s, "<script>{SCRIPT}</script>\n</body>\n</html>\n");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(escape(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }

    #[test]
    fn sort_keys_take_the_leading_number() {
        assert_eq!(sort_key("3.21 ± 0.04"), Some(3.21));
        assert_eq!(sort_key("[3.1, 3.3]"), Some(3.1));
        assert_eq!(sort_key("2/2"), Some(2.0));
        assert_eq!(sort_key("-1.5e-3"), Some(-1.5e-3));
        for text in ["-", "", "*", "kernel_size=2", "finished", "e5", "3a9f01", "12ab"] {
            assert_eq!(sort_key(text), None, "{text}");
        }
    }

    #[test]
    fn numeric_columns_allow_missing_cells_only() {
        assert!(numeric_column(&["1.0", "-", "2"]));
        assert!(!numeric_column(&["1.0", "abc"]));
        assert!(!numeric_column(&["*", " "]));
    }

    #[test]
    fn sortable_marks_numeric_headers_and_escapes() {
        let header = vec!["name".to_string(), "n<ll".to_string()];
        let texts = vec![vec!["<b>".to_string(), "1.5".to_string()]];
        let cells: Vec<Vec<String>> = texts.iter().map(|r| r.iter().map(|c| td(c)).collect()).collect();
        let s = sortable("t", &header, &texts, &cells);
        assert!(s.contains("<th data-type=\"text\" title=\"sort\">name</th>"), "{s}");
        assert!(s.contains("<th data-type=\"num\" title=\"sort\">n&lt;ll</th>"), "{s}");
        assert!(s.contains("<td>&lt;b&gt;</td><td data-v=\"1.5\">1.5</td>"), "{s}");
    }
}
