#!/usr/bin/env node
// Browser end-to-end runner for turnserver (driven by tests/browser.rs).
//
// Launches Debian's Chromium (never a downloaded browser) headless through playwright-core,
// serves page.html from 127.0.0.1, runs each case in a fresh page and prints ONE JSON line on
// standard output: {"ok":..., "browserVersion":..., "cases":[...]}. Diagnostics go to standard
// error. Exit status: 0 when every case ran (whether or not it met expectations: the caller
// judges), 1 when the runner itself failed (the JSON line then has "ok": false and "error").
//
// Configuration: JSON in argv[2], or in the environment variable TURNSERVER_BROWSER_CONFIG:
// {
//   "cases": [{ "name": "udp",
//               "urls": "turn:127.0.0.1:3478?transport=udp",   // string or array
//               "username": "alice", "credential": "wonderland",
//               "expectRelayProtocol": "udp" | "tcp" | "tls",  // informational here
//               "expectError": 401,                             // optional
//               "dataChannel": true }],                         // optional; default: true
//                                                               // unless expectError is set
//   "chromium": "/usr/bin/chromium",     // optional
//   "home": "/tmp/somewhere",            // optional HOME for Chromium (default: a fresh temp dir)
//   "caCert": "/path/ca.pem",            // optional: trusted through an NSS db in that HOME
//   "tlsProbe": { "cert": "server.pem", "key": "server.key" },  // optional: load an https page
//                                        // served with this certificate, to prove the trust
//   "gatherTimeoutMs": 15000, "connectTimeoutMs": 20000, "transferTimeoutMs": 20000,
//   "deadlineMs": 75000                  // the whole run; cases not run by then are reported
// }

import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FLAGS } from './chromium.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const log = (...args) => console.error('[run.mjs]', ...args);

function readConfig() {
  const text = process.argv[2] ?? process.env.TURNSERVER_BROWSER_CONFIG;
  if (!text) throw new Error('no configuration: pass JSON as argv[2] or TURNSERVER_BROWSER_CONFIG');
  const config = JSON.parse(text);
  if (!Array.isArray(config.cases) || config.cases.length === 0) throw new Error('config.cases is empty');
  return {
    chromium: '/usr/bin/chromium',
    gatherTimeoutMs: 15000,
    connectTimeoutMs: 20000,
    transferTimeoutMs: 20000,
    deadlineMs: 75000,
    ...config,
  };
}

/** A fresh NSS database in `home` that trusts `caCert` for TLS servers (Chromium reads it). */
export function trustCa(home, caCert) {
  const db = path.join(home, '.pki', 'nssdb');
  mkdirSync(db, { recursive: true });
  const certutil = (...args) => {
    try {
      return execFileSync('certutil', ['-d', `sql:${db}`, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      if (e.code === 'ENOENT') throw new Error('certutil not found: apt-get install libnss3-tools');
      throw new Error(`certutil ${args.join(' ')} failed: ${e.stderr || e.message}`);
    }
  };
  certutil('-N', '--empty-password');
  certutil('-A', '-n', 'turnserver-test-ca', '-t', 'C,,', '-i', caCert);
  const listed = certutil('-L');
  if (!listed.includes('turnserver-test-ca')) throw new Error(`CA not in the NSS db:\n${listed}`);
  return db;
}

/** Serves page.html on 127.0.0.1 (http, or https with the given certificate). */
async function servePage(tls) {
  const page = readFileSync(path.join(here, 'page.html'));
  const handler = (req, res) => {
    if (req.url === '/' || req.url === '/page.html') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(page);
    } else if (req.url === '/favicon.ico') {
      res.writeHead(204);
      res.end();
    } else {
      res.writeHead(404);
      res.end();
    }
  };
  const server = tls
    ? https.createServer({ cert: readFileSync(tls.cert), key: readFileSync(tls.key) }, handler)
    : http.createServer(handler);
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  return { server, url: `${tls ? 'https' : 'http'}://127.0.0.1:${port}/` };
}

/** Rejects after `ms` with `what` in the message; the timer never keeps node alive. */
function timeout(ms, what) {
  return new Promise((_, reject) => {
    setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms).unref();
  });
}

async function main() {
  const config = readConfig();
  const started = Date.now();
  // A backstop: whatever hangs, do not outlive the deadline by much (playwright's own exit
  // handler closes Chromium).
  setTimeout(() => {
    log('hard deadline reached, exiting');
    process.exit(2);
  }, config.deadlineMs + 10000).unref();
  const remaining = () => config.deadlineMs - (Date.now() - started);
  const temps = [];
  const output = { ok: false, browserVersion: null, cases: [], tlsProbe: null, durationMs: null };
  let context = null;
  const servers = [];
  try {
    const userDataDir = mkdtempSync(path.join(os.tmpdir(), 'turnserver-chromium-profile-'));
    temps.push(userDataDir);
    let home = config.home;
    if (!home) {
      home = mkdtempSync(path.join(os.tmpdir(), 'turnserver-chromium-home-'));
      temps.push(home);
    }
    if (config.caCert) {
      const db = trustCa(home, config.caCert);
      log(`trusting ${config.caCert} through ${db}`);
    }

    // Imported here so that a missing playwright-core still yields the JSON line.
    const { chromium } = await import('playwright-core');
    const page = await servePage(null);
    servers.push(page.server);
    // launchPersistentContext: the only way playwright takes our own --user-data-dir.
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: config.chromium,
      headless: true,
      args: FLAGS,
      env: { ...process.env, HOME: home },
      timeout: 30000,
    });
    output.browserVersion = context.browser()?.version() ?? null;
    context.on('console', (m) => log(`console.${m.type()}: ${m.text()}`));
    const initial = context.pages();

    if (config.tlsProbe) {
      const probe = await servePage(config.tlsProbe);
      servers.push(probe.server);
      const p = await context.newPage();
      try {
        const response = await p.goto(probe.url, { timeout: 10000 });
        output.tlsProbe = { ok: response?.ok() ?? false, url: probe.url };
      } catch (e) {
        output.tlsProbe = { ok: false, url: probe.url, error: String(e.message ?? e).split('\n')[0] };
      } finally {
        await p.close();
      }
    }

    for (const c of config.cases) {
      const spec = {
        dataChannel: !c.expectError,
        gatherTimeoutMs: config.gatherTimeoutMs,
        connectTimeoutMs: config.connectTimeoutMs,
        transferTimeoutMs: config.transferTimeoutMs,
        ...c,
      };
      if (remaining() < 5000) {
        output.cases.push({ name: c.name, error: 'not run: the runner deadline had passed' });
        continue;
      }
      const p = await context.newPage();
      const caseStarted = Date.now();
      try {
        p.on('pageerror', (e) => log(`${c.name}: page error: ${e.message}`));
        await p.goto(page.url, { timeout: 10000 });
        const budget = Math.min(
          remaining() - 2000,
          spec.gatherTimeoutMs + 2000 + (spec.dataChannel ? spec.connectTimeoutMs + spec.transferTimeoutMs + 2000 : 0) + 5000,
        );
        const result = await Promise.race([
          p.evaluate((s) => window.runCase(s), spec),
          timeout(budget, `case ${c.name}`),
        ]);
        result.durationMs = Date.now() - caseStarted;
        output.cases.push(result);
        log(`${c.name}: done in ${result.durationMs} ms`);
      } catch (e) {
        output.cases.push({ name: c.name, error: String(e.message ?? e), durationMs: Date.now() - caseStarted });
        log(`${c.name}: ${e.stack ?? e}`);
      } finally {
        await p.close().catch(() => {});
      }
    }
    for (const p of initial) await p.close().catch(() => {});
    output.ok = true;
  } catch (e) {
    output.error = String(e.message ?? e);
    log(e.stack ?? e);
  } finally {
    if (context) await Promise.race([context.close(), timeout(10000, 'closing Chromium')]).catch((e) => log(e.message));
    for (const s of servers) s.close();
    for (const dir of temps) rmSync(dir, { recursive: true, force: true });
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
