// The API documentation page (/docs, Swagger UI) in real headless Chromium
// under the Content-Security-Policy the gateway sends with it: it must render
// the document and try nothing the policy refuses. Run by
// tests/test_console_browser.py; input: DOCS_URL; output: one JSON line.
import { chromium } from "playwright-core";

const url = process.env.DOCS_URL;
if (!url) throw new Error("DOCS_URL is not set");
const problems = [];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-background-networking"],
});
try {
  const page = await (await browser.newContext()).newPage();
  page.setDefaultTimeout(20_000);
  page.on("console", (msg) => {
    const text = msg.text();
    if (/Content.Security.Policy|Refused to/i.test(text)) problems.push(`CSP: ${text}`);
    else if (msg.type() === "error") problems.push(`console error: ${text}`);
  });
  page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  page.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${new URL(r.url()).pathname}`);
  });
  await page.goto(url);
  const title = await page.locator(".swagger-ui .info .title").textContent();
  // An operation of the document, opened: its details render too.
  await page.locator(".opblock-summary").first().click();
  await page.locator(".opblock-body").first().waitFor();
  const violations = await page.evaluate(
    () =>
      new Promise((resolve) => {
        const seen = [];
        document.addEventListener("securitypolicyviolation", (e) => seen.push(e.violatedDirective));
        setTimeout(() => resolve(seen), 500);
      }),
  );
  problems.push(...violations.map((d) => `violation: ${d}`));
  process.stdout.write(JSON.stringify({ title, problems }) + "\n");
} finally {
  await browser.close();
}
