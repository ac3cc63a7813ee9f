#!/usr/bin/env node
// Runner for the server's self-test page (driven by tests/selftest_page.rs).
//
// Launches Debian's Chromium (never a downloaded browser) headless through playwright-core,
// opens the page the server serves at "/" of its prometheus-port listener, and uses it as an
// operator would: fill in the form, click Gather, read the verdict. Prints ONE JSON line on
// standard output:
//   {"ok":..., "browserVersion":..., "initial":{...}, "cases":[...], "requests":[...],
//    "pageErrors":[...], "consoleErrors":[...]}
// Diagnostics go to standard error. Exit status 0 when every case ran (the caller judges the
// results), 1 when the runner itself failed (then "ok" is false and "error" says why).
//
// Configuration: JSON in argv[2] or in the environment variable TURNSERVER_SELFTEST_CONFIG:
// {
//   "pageUrl": "http://127.0.0.1:9641/",
//   "cases": [{ "name": "udp",
//               "url": "turn:127.0.0.1:3478?transport=udp",  // optional (or null): keep the field's value
//               "username": "alice", "password": "wonderland",
//               "relayOnly": true, "dataTest": false }],
//   "chromium": "/usr/bin/chromium",   // optional
//   "caseTimeoutMs": 25000,            // optional: one Gather, from click to verdict
//   "deadlineMs": 40000                // optional: the whole run
// }

import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FLAGS } from './chromium.mjs';

const log = (...args) => console.error('[selftest.mjs]', ...args);

function readConfig() {
  const text = process.argv[2] ?? process.env.TURNSERVER_SELFTEST_CONFIG;
  if (!text) throw new Error('no configuration: pass JSON as argv[2] or TURNSERVER_SELFTEST_CONFIG');
  const config = JSON.parse(text);
  if (!config.pageUrl) throw new Error('config.pageUrl is missing');
  if (!Array.isArray(config.cases)) throw new Error('config.cases is missing');
  return { chromium: '/usr/bin/chromium', caseTimeoutMs: 25000, deadlineMs: 40000, ...config };
}

/** What the page shows, read from the DOM through its stable ids. */
function readPage() {
  const text = (el) => (el ? el.textContent.trim() : null);
  const rows = [...document.querySelectorAll('#candidates tbody tr')].map((tr) => ({
    type: tr.dataset.type,
    cells: [...tr.cells].map((td) => td.textContent),
  }));
  const errors = [...document.querySelectorAll('#errors li')].map((li) => ({
    code: li.dataset.code,
    text: li.textContent,
  }));
  return {
    url: document.getElementById('url').value,
    presets: [...document.querySelectorAll('#preset option')].map((o) => o.value),
    relayOnly: document.getElementById('relay-only').checked,
    status: document.getElementById('verdict').dataset.status,
    verdict: text(document.getElementById('verdict')),
    errorBoxVisible: !document.getElementById('error-box').hidden,
    rows,
    errors,
    firstRelayMs: text(document.getElementById('t-relay')),
    completeMs: text(document.getElementById('t-complete')),
    data: text(document.getElementById('t-data')),
    gatherDisabled: document.getElementById('gather').disabled,
  };
}

async function runCase(page, c, timeoutMs) {
  if (typeof c.url === 'string') await page.fill('#url', c.url);
  await page.fill('#username', c.username ?? '');
  await page.fill('#password', c.password ?? '');
  await page.setChecked('#relay-only', c.relayOnly ?? true);
  await page.setChecked('#data-test', c.dataTest ?? false);
  await page.evaluate(() => { window.selfTestResult = undefined; });
  const started = Date.now();
  await page.click('#gather');
  const running = await page.evaluate(() => document.getElementById('verdict').dataset.status);
  await page.waitForFunction(() => window.selfTestResult, null, { timeout: timeoutMs, polling: 50 });
  const result = await page.evaluate(() => window.selfTestResult);
  // The button is enabled again right after the result is set.
  await page.waitForFunction(() => !document.getElementById('gather').disabled, null, { timeout: 2000 });
  return { name: c.name, statusWhileRunning: running, ms: Date.now() - started, result, dom: await page.evaluate(readPage) };
}

async function main() {
  const config = readConfig();
  const started = Date.now();
  setTimeout(() => {
    log('hard deadline reached, exiting');
    process.exit(2);
  }, config.deadlineMs + 10000).unref();
  const output = {
    ok: false, browserVersion: null, initial: null, cases: [],
    requests: [], pageErrors: [], consoleErrors: [], durationMs: null,
  };
  const userDataDir = mkdtempSync(path.join(os.tmpdir(), 'turnserver-selftest-profile-'));
  const home = mkdtempSync(path.join(os.tmpdir(), 'turnserver-selftest-home-'));
  let context = null;
  try {
    const { chromium } = await import('playwright-core');
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: config.chromium,
      headless: true,
      args: FLAGS,
      env: { ...process.env, HOME: home },
      timeout: 30000,
    });
    output.browserVersion = context.browser()?.version() ?? null;
    context.on('request', (r) => output.requests.push(r.url()));
    const page = context.pages()[0] ?? (await context.newPage());
    page.on('pageerror', (e) => output.pageErrors.push(String(e.message ?? e)));
    page.on('console', (m) => {
      log(`console.${m.type()}: ${m.text()}`);
      if (m.type() === 'error') output.consoleErrors.push(m.text());
    });
    const response = await page.goto(config.pageUrl, { timeout: 10000 });
    output.initial = {
      httpStatus: response?.status() ?? null,
      headers: response ? await response.allHeaders() : {},
      title: await page.title(),
      ...(await page.evaluate(readPage)),
    };
    for (const c of config.cases) {
      const left = config.deadlineMs - (Date.now() - started);
      if (left < 3000) {
        output.cases.push({ name: c.name, error: 'not run: the runner deadline had passed' });
        continue;
      }
      try {
        const r = await runCase(page, c, Math.min(config.caseTimeoutMs, left - 1000));
        log(`${c.name}: ${r.result?.verdict} (${r.ms} ms)`);
        output.cases.push(r);
      } catch (e) {
        const dom = await page.evaluate(readPage).catch(() => null);
        output.cases.push({ name: c.name, error: String(e.message ?? e).split('\n')[0], dom });
        log(`${c.name}: ${e.stack ?? e}`);
      }
    }
    output.ok = true;
  } catch (e) {
    output.error = String(e.message ?? e);
    log(e.stack ?? e);
  } finally {
    if (context) {
      await Promise.race([context.close(), new Promise((r) => setTimeout(r, 10000).unref())])
        .catch((e) => log(e.message));
    }
    for (const dir of [userDataDir, home]) rmSync(dir, { recursive: true, force: true });
    output.durationMs = Date.now() - started;
  }
  process.stdout.write(`${JSON.stringify(output)}\n`);
  return output.ok ? 0 : 1;
}

main().then(
  (code) => { process.exitCode = code; },
  (e) => {
    process.stdout.write(`${JSON.stringify({ ok: false, error: String(e.message ?? e), cases: [] })}\n`);
    process.exitCode = 1;
  },
);
