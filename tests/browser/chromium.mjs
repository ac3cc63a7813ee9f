// Chromium's command line for the browser runners (run.mjs, selftest.mjs): headless Debian
// Chromium that contacts nothing but IP literals and makes no background traffic.

export const FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--allow-loopback-in-peer-connection',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  // Nothing but IP literals is contacted: no name resolves (localhost excepted).
  '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1',
];
