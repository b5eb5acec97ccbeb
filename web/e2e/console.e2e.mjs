// The console end to end in real headless Chromium (Debian's, driven by
// playwright-core: nothing is downloaded). Run by tests/test_console_browser.py,
// which starts the suite and the fake Ollama, seeds data, and checks what the
// fake received. Input: environment variables; output: one JSON line on stdout.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const BASE = env("CONSOLE_URL");
const USER_KEY = env("USER_KEY");
const ADMIN_KEY = env("ADMIN_KEY");
const SHOTS = env("SCREENSHOT_DIR");
const TIMEOUT = 20_000;
mkdirSync(SHOTS, { recursive: true });

const out = { keyName: `browser-made-${Date.now().toString(36)}` };
const problems = [];

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

async function step(name, work) {
  const started = Date.now();
  process.stderr.write(`e2e: ${name}…\n`);
  await work();
  process.stderr.write(`e2e: ${name} ok (${Date.now() - started} ms)\n`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-background-networking"],
});

async function newPage(options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, ...options });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("console", (msg) => {
    const text = msg.text();
    if (/Content.Security.Policy|Refused to/i.test(text)) problems.push(`CSP: ${text}`);
    if (msg.type() === "error" && !/status of (401|403|404)/.test(text)) problems.push(`console error: ${text}`);
  });
  page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  page.on("request", (req) => {
    if (!req.url().startsWith(BASE)) problems.push(`request to another origin: ${req.url()}`);
  });
  return page;
}

async function signIn(page, key) {
  await page.goto(BASE + "/");
  await page.getByLabel("API key").fill(key);
  await page.getByRole("button", { name: "Sign in" }).click();
}

async function pickModel(page, name) {
  const dialog = page.getByRole("dialog");
  await dialog.getByRole("option", { name: new RegExp("^" + name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")) }).click();
  return dialog;
}

async function newConversation(page, title, model) {
  await page.getByRole("button", { name: "New conversation" }).click();
  const dialog = page.getByRole("dialog");
  await dialog.getByLabel("Title").fill(title);
  await pickModel(page, model);
  await dialog.getByRole("button", { name: "Create conversation" }).click();
  await dialog.waitFor({ state: "hidden" });
  await page.getByRole("heading", { name: title }).waitFor();
}

async function sendMessage(page, text) {
  const box = page.getByLabel("Message", { exact: true });
  await box.fill(text);
  await box.press("Enter");
}

const log = (page) => page.getByTestId("chat-log");

try {
  const page = await newPage();

  await step("the page carries the CSP and loads nothing from elsewhere", async () => {
    const answer = await page.goto(BASE + "/");
    const csp = answer.headers()["content-security-policy"] ?? "";
    check(csp.includes("default-src 'self'"), `CSP header: ${csp}`);
  });

  await step("a wrong key is refused", async () => {
    await signIn(page, "sk-marie-not-a-real-key");
    await page.getByRole("alert").filter({ hasText: "not valid" }).waitFor();
    await page.screenshot({ path: join(SHOTS, "sign-in.png") });
    check((await page.evaluate(() => sessionStorage.length)) === 0, "a wrong key is not kept");
  });

  await step("sign in; the key stays in session storage only", async () => {
    await page.getByLabel("API key").fill(USER_KEY);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("button", { name: "New conversation" }).waitFor();
    const stored = await page.evaluate(() => Object.values(sessionStorage));
    check(stored.includes(USER_KEY), "key in sessionStorage");
    check((await page.evaluate(() => document.cookie)) === "", "no cookie");
    check(!page.url().includes(USER_KEY), "key not in the URL");
    check((await page.evaluate(() => localStorage.length)) === 0 || !(await page.evaluate((k) => Object.values(localStorage).includes(k), USER_KEY)), "key not in localStorage");
  });

  await step("pick a model: providers' health, search, details", async () => {
    await page.getByRole("button", { name: "New conversation" }).click();
    const dialog = page.getByRole("dialog");
    await dialog.getByText("ollama: healthy").waitFor();
    await dialog.getByLabel("Search models").fill("qwen");
    check((await dialog.getByRole("option").count()) === 1, "search narrows to one model");
    await dialog.getByLabel("Search models").fill("");
    await pickModel(page, "llama3.2:latest");
    const details = dialog.getByTestId("model-details");
    await details.getByText("131,072").waitFor();
    const text = await details.innerText();
    check(text.includes("llama") && text.includes("Q4_K_M") && text.includes("3.2B"), `details: ${text}`);
    await page.screenshot({ path: join(SHOTS, "model-selector.png") });
    await dialog.getByRole("button", { name: "Cancel" }).click();
    await dialog.waitFor({ state: "hidden" });
  });

  await step("chat: a streamed answer as Markdown; Shift+Enter is a new line", async () => {
    await newConversation(page, "Tea talk", "llama3.2:latest");
    const box = page.getByLabel("Message", { exact: true });
    await box.click();
    await page.keyboard.type("first line");
    await page.keyboard.press("Shift+Enter");
    await page.keyboard.type("second line");
    check((await box.inputValue()) === "first line\nsecond line", "Shift+Enter adds a newline");
    await box.fill("I like **green tea**");
    await box.press("Enter");
    await log(page).getByText("Hello from llama3.2:latest!").waitFor();
    // The reply quotes the message; its Markdown is rendered.
    await log(page).locator("[data-role=assistant] strong", { hasText: "green tea" }).waitFor();
    check((await box.inputValue()) === "", "the box is emptied after sending");
  });

  await step("untrusted HTML in a message neither runs nor renders", async () => {
    await sendMessage(page, 'look <img src="/x" onerror="window.__pwned=1"> <script>window.__pwned=2</script> pwnedword');
    await log(page).locator("[data-role=assistant]").filter({ hasText: "pwnedword" }).waitFor();
    check((await log(page).locator("img, script").count()) === 0, "no img/script in the chat log");
    check((await page.evaluate(() => window.__pwned)) === undefined, "no script ran");
  });

  await step("change model mid-conversation", async () => {
    await page.getByRole("button", { name: "Change model" }).click();
    const dialog = await pickModel(page, "qwen2.5:0.5b");
    await dialog.getByRole("button", { name: "Use this model" }).click();
    await page.getByTestId("conversation-model").filter({ hasText: "ollama/qwen2.5:0.5b" }).waitFor();
    await sendMessage(page, "What about coffee?");
    await log(page).getByText("Hello from qwen2.5:0.5b!").waitFor();
    await page.screenshot({ path: join(SHOTS, "chat.png") });
  });

  await step("stop a slow answer with the button, then with Esc", async () => {
    await newConversation(page, "Endless story", "endless:latest");
    await sendMessage(page, "Tell me everything");
    const pending = page.getByTestId("pending-answer");
    await pending.locator(".markdown").waitFor();
    await page.getByRole("button", { name: "Stop" }).click();
    await pending.getByTestId("stopped").waitFor();
    await page.getByRole("button", { name: "Send" }).waitFor();
    await sendMessage(page, "Again");
    // The new turn replaces the stopped one: wait for its own first tokens.
    await pending.getByTestId("stopped").waitFor({ state: "detached" });
    await pending.locator(".markdown").waitFor();
    await page.keyboard.press("Escape");
    await pending.getByTestId("stopped").waitFor();
  });

  await step("an error mid-stream is shown in place", async () => {
    await page.getByRole("button", { name: "Change model" }).click();
    const dialog = await pickModel(page, "broken:latest");
    await dialog.getByRole("button", { name: "Use this model" }).click();
    await page.getByTestId("conversation-model").filter({ hasText: "ollama/broken:latest" }).waitFor();
    await sendMessage(page, "Break please");
    const pending = page.getByTestId("pending-answer");
    await pending.getByRole("alert").waitFor();
    const text = await pending.innerText();
    check(text.includes("one two"), `the partial answer stays: ${text}`);
    check(/failed/i.test(text), `the error is said: ${text}`);
  });

  await step("rename, then delete with confirmation", async () => {
    const list = page.getByTestId("conversation-list");
    // Newest first: the conversation used last is on top.
    check((await list.getByRole("button").first().innerText()).includes("Endless story"), "newest first");
    await page.getByRole("button", { name: "Rename Endless story" }).click();
    const dialog = page.getByRole("dialog");
    await dialog.getByLabel("Title").fill("Renamed story");
    await dialog.getByRole("button", { name: "Rename" }).click();
    await list.getByText("Renamed story").waitFor();
    await page.getByRole("button", { name: "Delete Renamed story" }).click();
    await page.getByRole("dialog").getByRole("button", { name: "Delete" }).click();
    await list.getByText("Renamed story").waitFor({ state: "detached" });
    await list.getByText("Tea talk").first().waitFor();
  });

  await step("search with highlights; the snippet's HTML stays text", async () => {
    await page.getByLabel("Search messages").fill("pwnedword");
    await page.getByLabel("Search messages").press("Enter");
    const results = page.getByTestId("search-results");
    await results.locator("mark").first().waitFor();
    const marks = await results.locator("mark").allInnerTexts();
    check(marks.some((m) => m.toLowerCase() === "pwnedword"), `marks: ${marks}`);
    check((await results.locator("img, script").count()) === 0, "no img/script in results");
    // The escaped snippet reads as the text that was sent, not as entities.
    const said = await results.innerText();
    check(said.includes('onerror="window.__pwned=1">') && !said.includes("&lt;"), `snippet text: ${said}`);
    check((await page.evaluate(() => window.__pwned)) === undefined, "no script ran");
    await page.getByLabel("Search messages").fill("green");
    await page.getByLabel("Search messages").press("Enter");
    await results.locator("mark", { hasText: /green/i }).first().waitFor();
    await page.screenshot({ path: join(SHOTS, "search.png") });
    await page.getByLabel("Search messages").fill("");
  });

  await step("compare two models side by side", async () => {
    await page.goto(BASE + "/#/compare");
    const select = page.getByRole("textbox", { name: "Models (2 to 8)" });
    await select.click();
    await page.getByRole("option", { name: "ollama/llama3.2:latest" }).click();
    await page.getByRole("option", { name: "ollama/gemma3:1b" }).click();
    await page.keyboard.press("Escape");
    await page.getByLabel("Prompt").fill("Say hi");
    await page.getByLabel("Prompt").press("Enter");
    const arms = page.getByTestId("compare-arm");
    await arms.nth(0).getByText("Hello from llama3.2:latest!").waitFor();
    await arms.nth(1).getByText("Hello from gemma3:1b!").waitFor();
    for (const i of [0, 1]) {
      await arms.nth(i).getByText(/^total \d+ ms$/).waitFor();
      const text = await arms.nth(i).innerText();
      check(/\d+ \/ \d+ tokens/i.test(text), `tokens shown: ${text}`);
    }
    await page.screenshot({ path: join(SHOTS, "compare.png") });
  });

  await step("memories: search with scores, edit, history, delete, forget all", async () => {
    await page.goto(BASE + "/#/memories");
    const list = page.getByTestId("memory-list");
    await list.getByText("Alice lives in Lyon").waitFor();
    await list.getByText("Alice likes green tea").waitFor();
    await page.getByLabel("Search memories").fill("green tea");
    await page.getByRole("button", { name: "Search" }).click();
    await list.getByTestId("memory-score").first().waitFor();
    await page.screenshot({ path: join(SHOTS, "memories.png") });
    await page.getByLabel("Search memories").fill("");
    await page.getByRole("button", { name: "Search" }).click();
    const lyon = list.getByTestId("memory").filter({ hasText: "Alice lives in Lyon" });
    await lyon.getByRole("button", { name: "Edit" }).click();
    await page.getByRole("dialog").getByLabel("Text").fill("Alice lives in Paris");
    await page.getByRole("dialog").getByRole("button", { name: "Save" }).click();
    const paris = list.getByTestId("memory").filter({ hasText: "Alice lives in Paris" });
    await paris.waitFor();
    await paris.getByRole("button", { name: "History" }).click();
    const history = page.getByTestId("memory-history");
    await history.getByText("Alice lives in Lyon").first().waitFor();
    await history.getByText("Alice lives in Paris").waitFor();
    await page.keyboard.press("Escape");
    await history.waitFor({ state: "detached" });
    await paris.getByRole("button", { name: "Delete" }).click();
    await page.getByRole("dialog").getByRole("button", { name: "Delete" }).click();
    await paris.waitFor({ state: "detached" });
    await page.getByRole("button", { name: "Forget everything" }).click();
    await page.getByRole("dialog").getByRole("button", { name: "Forget everything" }).click();
    await page.getByText("No memories yet.").waitFor();
  });

  await step("a key without admin is refused on the admin pages", async () => {
    await page.goto(BASE + "/#/keys");
    await page.getByRole("alert").filter({ hasText: "admin" }).waitFor();
    check((await page.getByTestId("keys-table").count()) === 0, "no key table");
    await page.goto(BASE + "/#/usage");
    await page.getByRole("alert").filter({ hasText: "admin" }).waitFor();
  });

  await step("sign out", async () => {
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.getByLabel("API key").waitFor();
    check((await page.evaluate(() => sessionStorage.length)) === 0, "key forgotten");
  });

  await step("as admin: create a key (shown once), then revoke it", async () => {
    await page.goto(BASE + "/#/keys");
    await page.getByLabel("API key").fill(ADMIN_KEY);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByTestId("keys-table").waitFor();
    await page.getByRole("button", { name: "Create key" }).click();
    const dialog = page.getByRole("dialog");
    await dialog.getByLabel("Name").fill(out.keyName);
    await dialog.getByLabel("Owner (user or team)").fill("bob");
    await dialog.getByLabel("Requests per minute").fill("30");
    await dialog.getByLabel("Monthly budget (USD)").fill("5");
    await dialog.getByRole("button", { name: "Create" }).click();
    const secret = page.getByTestId("new-key");
    await secret.waitFor();
    out.createdKey = (await secret.innerText()).trim();
    // The plaintext shown is a working key (until it is revoked below).
    const works = await fetch(BASE + "/api/usage", { headers: { authorization: `Bearer ${out.createdKey}` } });
    check(works.status === 200, `the key shown works: ${works.status}`);
    await page.screenshot({ path: join(SHOTS, "key-created.png") });
    await page.getByRole("dialog").getByRole("button", { name: "Done" }).click();
    await page.getByRole("dialog").waitFor({ state: "detached" });
    const row = page.locator(`tr[data-key-name="${out.keyName}"]`);
    await row.getByText("active").waitFor();
    // Spent this month beside the monthly budget set in the form.
    await row.getByTestId("key-spend").getByText("0 / 5").waitFor();
    check(!(await page.locator("body").innerText()).includes(out.createdKey), "the plaintext is gone from the page");
    // Edit: limits and allowed models.
    await page.getByRole("button", { name: `Edit ${out.keyName}` }).click();
    const edit = page.getByRole("dialog");
    await edit.getByLabel("Requests per minute").fill("60");
    await edit.getByLabel("Allowed models").fill("ollama/*");
    await edit.getByLabel("Allowed models").press("Enter");
    await edit.getByRole("button", { name: "Save" }).click();
    await page.getByRole("dialog").waitFor({ state: "detached" });
    // Rotate: a new secret, shown once; the old one stops working.
    await page.getByRole("button", { name: `Rotate ${out.keyName}` }).click();
    await page.getByRole("dialog").getByRole("button", { name: "Rotate" }).click();
    await secret.waitFor();
    out.rotatedKey = (await secret.innerText()).trim();
    check(out.rotatedKey !== out.createdKey, "rotation gives a new secret");
    const rotated = await fetch(BASE + "/api/usage", { headers: { authorization: `Bearer ${out.rotatedKey}` } });
    check(rotated.status === 200, `the rotated key works: ${rotated.status}`);
    const old = await fetch(BASE + "/api/usage", { headers: { authorization: `Bearer ${out.createdKey}` } });
    check(old.status === 401, `the old secret is refused after rotation: ${old.status}`);
    await page.getByRole("dialog").getByRole("button", { name: "Done" }).click();
    await page.getByRole("dialog").waitFor({ state: "detached" });
    // Revoke (the active key is the rotated one: only active keys have actions).
    await page.getByRole("button", { name: `Revoke ${out.keyName}` }).click();
    await page.getByRole("dialog").getByRole("button", { name: "Revoke" }).click();
    await page.getByRole("button", { name: `Revoke ${out.keyName}` }).waitFor({ state: "detached" });
    check((await row.getByText("active").count()) === 0, "no active key of that name is left");
    await page.screenshot({ path: join(SHOTS, "keys.png") });
  });

  await step("usage by day and by model, as charts", async () => {
    await page.goto(BASE + "/#/usage");
    await page.getByTestId("usage-total").waitFor();
    await page.locator(".recharts-surface").nth(1).waitFor();
    check((await page.locator(".recharts-bar-rectangle").count()) > 0, "bars drawn");
    check((await page.getByTestId("usage-total").innerText()).includes("USD"), "money beside tokens");
    for (const table of ["spend-by-model", "spend-by-key", "spend-by-owner"]) {
      await page.getByTestId(table).waitFor();
      check((await page.getByTestId(table).locator("tbody tr").count()) > 0, `${table} has rows`);
    }
    await page.screenshot({ path: join(SHOTS, "usage.png"), fullPage: true });
  });

  await step("phone width and dark theme", async () => {
    const phone = await newPage({ viewport: { width: 390, height: 844 }, colorScheme: "dark", isMobile: true, hasTouch: true });
    await signIn(phone, USER_KEY);
    const tea = phone.getByRole("button", { name: "Tea talk", exact: true }).first();
    await tea.click();
    await phone.getByText("Hello from qwen2.5:0.5b!").first().waitFor();
    const scheme = await phone.evaluate(() => document.documentElement.getAttribute("data-mantine-color-scheme"));
    check(scheme === "dark", `dark scheme: ${scheme}`);
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 1, `no horizontal scrolling at phone width (${overflow}px)`);
    await phone.screenshot({ path: join(SHOTS, "chat-phone-dark.png") });
    // The menu opens from the burger at this width; keyboard focus is visible.
    await phone.getByRole("button", { name: "Menu" }).click();
    await phone.getByRole("link", { name: "Memories" }).waitFor();
  });

  await step("keyboard focus is visible", async () => {
    await page.goto(BASE + "/#/chat");
    await page.reload();
    await page.getByRole("button", { name: "New conversation" }).waitFor();
    await page.keyboard.press("Tab");
    await page.keyboard.press("Tab");
    const outline = await page.evaluate(() => {
      const el = document.activeElement;
      if (!el || el === document.body) return "none";
      const style = getComputedStyle(el);
      return `${style.outlineStyle} ${style.outlineWidth} on ${el.outerHTML.slice(0, 160)}`;
    });
    check(outline !== "none" && !outline.startsWith("none"), `focused element has an outline: ${outline}`);
  });

  check(problems.length === 0, `browser problems:\n${problems.join("\n")}`);
  process.stdout.write(JSON.stringify({ ok: true, ...out }) + "\n");
} catch (exc) {
  process.stderr.write(`e2e failed: ${exc.stack ?? exc}\nbrowser problems so far:\n${problems.join("\n")}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
