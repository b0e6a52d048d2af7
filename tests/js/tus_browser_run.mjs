// Open a page in headless Chromium (Debian's, not a downloaded build) and run its `zkebScenario`.
//
// Reads a JSON job on stdin: {chromium, userDataDir, pageUrl, scenario} and prints one JSON line on stdout:
// {ok: true, result, console} or {ok: false, error, console}. Driven by
// tests/integration/backups/test_backups_tus_js_browser.py, which serves the page and judges the result.
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const job = JSON.parse(readFileSync(0, "utf8"));
const context = await chromium.launchPersistentContext(job.userDataDir, {
  executablePath: job.chromium,
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const consoleLines = [];
try {
  const page = await context.newPage();
  page.on("console", (message) => consoleLines.push(`${message.type()}: ${message.text()}`));
  await page.goto(job.pageUrl);
  await page.waitForFunction(() => typeof window.zkebScenario === "function" && typeof window.tus === "object");
  const result = await page.evaluate((scenario) => window.zkebScenario(scenario), job.scenario);
  console.log(JSON.stringify({ ok: true, result, console: consoleLines }));
} catch (err) {
  console.log(JSON.stringify({ ok: false, error: String(err && err.stack ? err.stack : err), console: consoleLines }));
} finally {
  await context.close();
}
