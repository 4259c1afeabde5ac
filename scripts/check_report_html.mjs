// Checks a `runner report --html` page in headless Chromium (playwright-core drives the
// system browser; no browser download). Usage:
//   node scripts/check_report_html.mjs REPORT.html [--screenshot OUT.png]
// Exit 0: the page loads with no console error, page error or request leaving the file; a
// click on a numeric column header sorts the rows ascending (and changes their order or the
// second click does), a second click sorts them descending; a run's config opens on a click;
// every image is decoded. Exit 1 with one line naming the failed check. Exit 77 when
// playwright-core or Chromium is missing (callers skip). CHROMIUM overrides the browser path.

import { existsSync } from "node:fs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

const SKIP = 77;

// Thrown by the checks; main closes the browser, prints one line and exits with `code`.
class Stop extends Error {
  constructor(code, line) {
    super(line);
    this.code = code;
  }
}

function fail(msg) {
  throw new Stop(1, `check_report_html: FAIL: ${msg}`);
}

function skip(msg) {
  throw new Stop(SKIP, `check_report_html: skipped: ${msg}`);
}

function parseArgs(argv) {
  const args = { file: null, screenshot: null };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--screenshot") args.screenshot = argv[++i];
    else if (!args.file) args.file = argv[i];
    else fail(`unexpected argument ${argv[i]}`);
  }
  if (!args.file) fail("usage: check_report_html.mjs REPORT.html [--screenshot OUT.png]");
  if (!existsSync(args.file)) fail(`${args.file}: no such file`);
  return args;
}

// $CHROMIUM when set (a path that does not exist means no browser), else the system one.
function findChromium() {
  if (process.env.CHROMIUM) return existsSync(process.env.CHROMIUM) ? process.env.CHROMIUM : null;
  const candidates = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];
  return candidates.find((p) => existsSync(p)) ?? null;
}

async function loadPlaywright() {
  try {
    return await import("playwright-core");
  } catch {
    return skip("playwright-core is not installed (run: npm ci --prefix scripts)");
  }
}

// Console errors, page errors and any request that is not file:, data: or about: (the page
// must be self-contained).
function watch(page) {
  const errors = [];
  page.on("console", (m) => m.type() === "error" && errors.push(`console error: ${m.text()}`));
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("request", (r) => /^(file|data|about|blob):/.test(r.url()) || errors.push(`external request: ${r.url()}`));
  page.on("requestfailed", (r) => errors.push(`failed request: ${r.url()}`));
  return errors;
}

function checkErrors(errors, when) {
  if (errors.length) fail(`${when}: ${errors[0]}${errors.length > 1 ? ` (and ${errors.length - 1} more)` : ""}`);
}

// Runs in the page: tags every body row and lists the numeric columns (every cell a leading
// number or "-"/empty, at least two distinct values), those not already ascending first.
function numericColumns() {
  const num = (t) => {
    const m = t.trim().match(/^\[?\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)(?=$|[\s\/,\]%])/);
    return m ? parseFloat(m[1]) : null;
  };
  const out = [];
  document.querySelectorAll("table").forEach((table, t) => {
    const body = table.tBodies[0];
    if (!body || !table.tHead) return;
    Array.from(body.rows).forEach((r, i) => r.setAttribute("data-check-row", `${t}:${i}`));
    const ths = Array.from(table.tHead.rows[0].cells);
    ths.forEach((th, c) => {
      const texts = Array.from(body.rows).map((r) => (r.cells[c] ? r.cells[c].textContent : ""));
      const vals = texts.map(num);
      const numeric = texts.every((x, i) => vals[i] !== null || /^\s*-?\s*$/.test(x));
      const present = vals.filter((v) => v !== null);
      if (!numeric || new Set(present).size < 2) return;
      const ascending = present.every((v, i) => i === 0 || present[i - 1] <= v);
      out.push({ table: t, col: c, header: th.textContent.trim(), ascending });
    });
  });
  return out.sort((a, b) => a.ascending - b.ascending);
}

// Runs in the page: the row tags and the column's numbers (null when missing), in row order.
function columnState([t, c]) {
  const num = (x) => {
    const m = x.trim().match(/^\[?\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)/);
    return m ? parseFloat(m[1]) : null;
  };
  const body = document.querySelectorAll("table")[t].tBodies[0];
  const rows = Array.from(body.rows);
  return { ids: rows.map((r) => r.getAttribute("data-check-row")), vals: rows.map((r) => num(r.cells[c].textContent)) };
}

function isSorted(vals, dir) {
  const v = vals.filter((x) => x !== null);
  return v.every((x, i) => i === 0 || dir * (x - v[i - 1]) >= 0);
}

async function checkSorting(page) {
  const cols = await page.evaluate(numericColumns);
  if (!cols.length) fail("no numeric column with two distinct values to sort by");
  const { table, col, header } = cols[0];
  const th = page.locator("table").nth(table).locator("thead th").nth(col);
  const before = await page.evaluate(columnState, [table, col]);
  await th.click();
  const asc = await page.evaluate(columnState, [table, col]);
  if (!isSorted(asc.vals, 1)) fail(`click on "${header}" did not sort ascending: ${JSON.stringify(asc.vals)}`);
  await th.click();
  const desc = await page.evaluate(columnState, [table, col]);
  if (!isSorted(desc.vals, -1)) fail(`second click on "${header}" did not sort descending: ${JSON.stringify(desc.vals)}`);
  const changed = (a, b) => a.ids.join() !== b.ids.join();
  if (!changed(before, asc) && !changed(before, desc)) fail(`clicks on "${header}" did not change the row order`);
  if (!changed(asc, desc)) fail(`second click on "${header}" did not reverse the order`);
  return `sorted by "${header}" (${asc.vals.length} rows)`;
}

async function checkConfig(page) {
  const details = page.locator("details").first();
  if ((await page.locator("details").count()) === 0) fail("no run config (<details>) on the page");
  const pre = details.locator("pre");
  if (await pre.isVisible()) fail("a config is shown before any click");
  await details.locator("summary").click();
  if (!(await pre.isVisible())) fail("a click on a config's summary did not show it");
  if (!(await pre.textContent()).trim()) fail("the opened config is empty");
}

async function checkImages(page) {
  const broken = await page.evaluate(() =>
    Array.from(document.images).filter((i) => !i.complete || i.naturalWidth === 0).map((i) => i.alt || i.src.slice(0, 40))
  );
  if (broken.length) fail(`${broken.length} image(s) did not decode: ${broken[0]}`);
  return page.evaluate(() => document.images.length);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const exe = findChromium();
  if (!exe) skip("no Chromium found (install the chromium package or set CHROMIUM)");
  const { chromium } = await loadPlaywright();
  const browser = await chromium.launch({ executablePath: exe, headless: true, args: ["--no-sandbox"] });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors = watch(page);
    await page.goto(pathToFileURL(resolve(args.file)).href, { waitUntil: "load" });
    checkErrors(errors, "loading the page");
    const images = await checkImages(page);
    const sorted = await checkSorting(page);
    await checkConfig(page);
    if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true });
    checkErrors(errors, "after the clicks");
    console.log(`check_report_html: ok: ${args.file}: no errors, ${images} image(s), ${sorted}, a config opens`);
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  const stop = e instanceof Stop ? e : new Stop(1, `check_report_html: FAIL: ${String(e?.message ?? e).split("\n")[0]}`);
  console.error(stop.message);
  process.exit(stop.code);
});
