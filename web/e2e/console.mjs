// The console in headless Chromium against the real binary (embedded SQLite and bus, demo
// catalogue) and a local SMTP server that first refuses mail, then takes it:
// place an order in the form, watch it turn CONFIRMED without a reload, cancel it, see the
// refund and the notifications; redrive a dead letter and see it sent. A screenshot of each
// page goes to e2e/artifacts/ (or $ARTIFACTS).
//
// ORDERWAVE_BIN names the binary (default: $CARGO_TARGET_DIR/debug/orderwave); CHROMIUM the
// browser (default /usr/bin/chromium, Debian's package).
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const bin =
  process.env.ORDERWAVE_BIN ??
  path.join(process.env.CARGO_TARGET_DIR ?? path.join(here, "../../target"), "debug/orderwave");
const browserPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const artifacts = process.env.ARTIFACTS ?? path.join(here, "artifacts");
mkdirSync(artifacts, { recursive: true });

/** A plain SMTP server: `accept` decides whether mail is taken (250) or put off (451, which
 * the platform retries until its attempts run out and the email is DEAD). */
function smtpServer() {
  const state = { accept: false, delivered: [] };
  const server = net.createServer((socket) => {
    let data = false;
    let message = "";
    let buffer = "";
    socket.write("220 e2e ESMTP\r\n");
    socket.on("data", (chunk) => {
      buffer += chunk.toString("utf8");
      let newline;
      while ((newline = buffer.indexOf("\r\n")) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 2);
        if (data) {
          if (line === ".") {
            data = false;
            state.delivered.push(message);
            message = "";
            socket.write("250 OK queued\r\n");
          } else {
            message += `${line}\n`;
          }
          continue;
        }
        const verb = line.slice(0, 4).toUpperCase();
        if (verb === "EHLO" || verb === "HELO") socket.write("250-e2e\r\n250 8BITMIME\r\n");
        else if (verb === "MAIL") socket.write(state.accept ? "250 OK\r\n" : "451 4.3.0 try again later\r\n");
        else if (verb === "RCPT") socket.write("250 OK\r\n");
        else if (verb === "DATA") {
          data = true;
          socket.write("354 go on\r\n");
        } else if (verb === "QUIT") {
          socket.end("221 bye\r\n");
        } else socket.write("250 OK\r\n");
      }
    });
    socket.on("error", () => {});
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({ server, state, port: server.address().port })));
}

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function until(what, check, timeoutMs = 30_000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (await check()) return;
    } catch {
      // not yet
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const smtp = await smtpServer();
const port = await freePort();
const base = `http://127.0.0.1:${port}`;
const dataDir = mkdtempSync(path.join(os.tmpdir(), "orderwave-e2e-"));
const server = spawn(
  bin,
  [
    "--demo",
    "--listen", `127.0.0.1:${port}`,
    "--data-dir", dataDir,
    "--smtp-host", "127.0.0.1",
    "--smtp-port", String(smtp.port),
    "--smtp-tls", "none",
    "--notification-retry-ms", "100",
    // The email breaker stays closed: each email uses up its own attempts quickly.
    "--dependency-policy", "notification-email:failures=1000",
  ],
  { stdio: ["ignore", "pipe", "pipe"] },
);
let serverLog = "";
server.stdout.on("data", (d) => (serverLog += d));
server.stderr.on("data", (d) => (serverLog += d));
const serverExit = new Promise((resolve) => server.on("exit", resolve));

let browser;
let failed = false;
const problems = [];
try {
  await until(`${bin} to be ready on ${base}`, async () => (await fetch(`${base}/health/ready`)).ok, 60_000);
  browser = await chromium.launch({
    executablePath: browserPath,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  // Any script error or refused load (a CSP violation included) fails the run.
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  const nav = (name) => page.getByRole("navigation", { name: "Main" }).getByRole("link", { name, exact: true });
  const shot = (name) => page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });
  /** Every form control on the page has a label a screen reader announces. */
  const labelled = async (where) => {
    const unlabelled = await page.$$eval("input, select, textarea", (els) =>
      els.filter((e) => !(e.labels && e.labels.length) && !e.getAttribute("aria-label")).map((e) => e.outerHTML),
    );
    if (unlabelled.length) throw new Error(`${where}: controls without a label: ${unlabelled.join(" ")}`);
  };

  // Sign in with the demo admin token.
  await page.goto(base);
  await labelled("sign in");
  await shot("01-sign-in");
  await page.getByRole("button", { name: "Sign in as the demo admin" }).click();
  await page.getByRole("heading", { name: "Orders" }).waitFor();

  // Place an order in the form.
  await nav("Place order").click();
  await page.getByLabel("Quantity of SKU-CHAIR").fill("2");
  await page.getByLabel("Quantity of SKU-LAMP").fill("1");
  await labelled("place order");
  await shot("02-place-order");
  await page.getByRole("button", { name: "Place order" }).click();
  await page.waitForURL(/#\/orders\/[0-9a-f-]{36}$/);
  const orderId = page.url().split("/").pop();
  // A marker that a reload would wipe: the status must change under it.
  await page.evaluate(() => (window.__noReload = true));
  const orderSection = page.getByRole("region", { name: `Order ${orderId}` });
  await orderSection.locator('.card-head [data-status="CONFIRMED"]').waitFor();
  if (!(await page.evaluate(() => window.__noReload === true))) throw new Error("the page reloaded");
  await page.getByRole("region", { name: "Timeline" }).locator('[data-to-status="CONFIRMED"]').waitFor();
  await page.locator('[data-payment-status="SUCCEEDED"]').waitFor();
  // The SMTP server put them off until their attempts ran out: the order's emails are DEAD.
  await page.locator('[data-notification="order.created"] [data-status="DEAD"]').waitFor();
  await labelled("order");
  await shot("03-order-confirmed");

  // The orders table shows it, live.
  await nav("Orders").click();
  await page.locator(`tr[data-order="${orderId}"] [data-status="CONFIRMED"]`).waitFor();
  await labelled("orders");
  await shot("04-orders");

  // Mail is taken from now on. Cancel: the order turns CANCELLED, the payment is refunded and
  // the cancellation and refund emails are sent.
  smtp.state.accept = true;
  await page.goto(`${base}/#/orders/${orderId}`);
  await page.getByLabel("Cancellation reason").fill("changed my mind");
  await page.getByRole("button", { name: "Cancel order" }).click();
  await orderSection.locator('.card-head [data-status="CANCELLED"]').waitFor();
  const total = "119.70";
  await page.locator(`[data-refunded="${total}"]`).waitFor();
  await page.locator('[data-notification="order.cancelled"] [data-status="SENT"]').waitFor();
  await page.locator('[data-notification="payment.refunded"] [data-status="SENT"]').waitFor();
  await shot("05-order-cancelled");

  // Operations: the dead letters are the refused emails; redrive one, and it is sent.
  await nav("Operations").click();
  const deadRows = page.getByRole("region", { name: "Dead letters" }).locator("tr[data-dead-letter]");
  await deadRows.first().waitFor();
  await page.getByRole("region", { name: "Outbox backlog" }).locator("tbody tr").first().waitFor();
  await shot("06-operations");
  const before = await deadRows.count();
  const deadId = await deadRows.first().getAttribute("data-dead-letter");
  await deadRows.first().getByRole("button", { name: "Redrive" }).click();
  await page.getByRole("status").filter({ hasText: "sent again" }).waitFor();
  await until("the redriven email to be sent", async () => {
    const response = await page.evaluate(
      async (id) => {
        const token = sessionStorage.getItem("orderwave.token");
        const r = await fetch(`/api/v1/admin/dead-letters`, { headers: { authorization: `Bearer ${token}` } });
        return (await r.json()).some((d) => d.id === id);
      },
      deadId,
    );
    return response === false;
  });
  await page.reload();
  await until("one dead letter fewer", async () => (await deadRows.count()) === before - 1);
  await labelled("operations");

  // Notifications: the log, then a template edited and previewed before it is saved.
  await nav("Notifications").click();
  await page.getByRole("region", { name: "Notifications" }).locator("tbody tr").first().waitFor();
  const editor = page.getByRole("form", { name: "Edit a template" });
  await editor.getByRole("combobox").selectOption("order.shipped.email");
  await editor.getByLabel("Subject").fill("On its way: {{ order.id }}");
  await page.getByRole("button", { name: "Preview" }).click();
  await page.locator(".preview-subject").filter({ hasText: "On its way:" }).waitFor();
  await labelled("notifications");
  await shot("07-notifications");

  // Inventory: set a product's stock.
  await nav("Inventory").click();
  await page.getByLabel("On hand of SKU-DESK").fill("42");
  await page.locator('tr[data-sku="SKU-DESK"]').getByRole("button", { name: "Set" }).click();
  await page.locator('tr[data-sku="SKU-DESK"] td:nth-child(4)').filter({ hasText: /^42$/ }).waitFor();
  await labelled("inventory");
  await shot("08-inventory");

  // Customers.
  await nav("Customers").click();
  await page.getByRole("region", { name: "Customers" }).locator("tbody tr").first().waitFor();
  await labelled("customers");
  await shot("09-customers");

  // A phone's width: the menu folds, every page still works.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.getByRole("button", { name: "Menu" }).click();
  await nav("Orders").click();
  await page.locator(`tr[data-order="${orderId}"]`).waitFor();
  await shot("10-orders-phone");
  // From the keyboard: the first tab stop is the skip link, which moves focus to the page.
  await page.reload();
  await page.locator(`tr[data-order="${orderId}"]`).waitFor();
  await page.keyboard.press("Tab");
  if ((await page.evaluate(() => document.activeElement?.textContent)) !== "Skip to content") {
    throw new Error("the first tab stop is not the skip link");
  }
  await page.keyboard.press("Enter");
  if ((await page.evaluate(() => document.activeElement?.id)) !== "main") {
    throw new Error("the skip link does not move focus to the page");
  }
  if (smtp.state.delivered.length < 3) throw new Error(`only ${smtp.state.delivered.length} emails arrived`);
  if (problems.length) throw new Error(`the browser reported:\n${problems.join("\n")}`);
  console.log(`console e2e: passed; screenshots in ${artifacts}`);
} catch (error) {
  failed = true;
  await browser?.contexts()[0]?.pages()[0]?.screenshot({ path: path.join(artifacts, "failure.png"), fullPage: true }).catch(() => {});
  console.error(`console e2e: FAILED: ${error.stack ?? error}`);
  if (problems.length) console.error(problems.join("\n"));
  console.error(`--- server log (last 60 lines) ---\n${serverLog.split("\n").slice(-60).join("\n")}`);
} finally {
  await browser?.close();
  server.kill("SIGTERM");
  await serverExit;
  smtp.server.close();
  rmSync(dataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
