// Test harness for the Node conformance suite: runs a `dps-server` for one test file, then runs that file in
// a child process whose environment trusts the server's CA through NODE_EXTRA_CA_CERTS (Node reads that
// variable once, at start-up, so the CA must exist before the process that uses the SDKs starts).
//
// Usage, first lines of a test file:
//
//   const harness = require('../lib/harness');
//   if (harness.wrapTestFile(__filename, '127.0.0.20')) return;   // the parent: server + child, nothing else
//   const { test } = require('node:test');                           // the child: the tests themselves
//   const dps = harness.server();                                     // { ip, idScope, connectionString, ... }
//
// Under `node --test`, the parent is the per-file test process; the child inherits its stdout (the test
// runner's reporting channel) and environment, so its results are reported as the file's own. The parent
// writes only to stderr.
'use strict';

const { execFileSync, spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..');
const ID_SCOPE = '0ne00000010';
const HUB_A = 'hub-a.example.net';
const HUB_B = 'hub-b.example.net';
const LINKED_HUBS = [HUB_A, HUB_B];
const CHILD_ENV = 'DPS_CONFORMANCE_SERVER';
const READY_TIMEOUT_MS = 90000;
const STOP_TIMEOUT_MS = 20000;

function log(message) {
  process.stderr.write(`[dps-conformance] ${message}\n`);
}

function serverBinary() {
  const bin = process.env.DPS_SERVER_BIN || path.join(REPO_ROOT, 'target', 'debug', 'dps-server');
  try {
    fs.accessSync(bin, fs.constants.X_OK);
  } catch (e) {
    throw new Error(`dps-server binary not found at ${bin}: run \`cargo build -p dps-server\` or set DPS_SERVER_BIN`);
  }
  return bin;
}

function configText(ip, dataDir) {
  const hubs = LINKED_HUBS.map((h) => `[[linked_hubs]]\nhost_name = "${h}"\n`).join('');
  return [
    `id_scope = "${ID_SCOPE}"`,
    `service_host_name = "${ip}"`,
    `device_host_name = "${ip}"`,
    `data_dir = "${dataDir}"`,
    'retry_after_secs = 1',
    '[listen]',
    `https = "${ip}:443"`,
    `mqtt = "${ip}:8883"`,
    `amqp = "${ip}:5671"`,
    '[tls]',
    `subject_alt_names = ["${ip}", "localhost"]`,
    hubs,
  ].join('\n');
}

function tail(file, lines = 60) {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
  } catch (e) {
    return '(no log)';
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Starts `dps-server run` and waits (bounded) for `ready.json`.
async function startServer(ip) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), `dps-conformance-node-${ip}-`));
  const configPath = `${dataDir}.toml`;
  const logPath = `${dataDir}.log`;
  fs.writeFileSync(configPath, configText(ip, dataDir));
  const logFd = fs.openSync(logPath, 'w');
  // The server reads DPS_* variables with precedence over the config file: keep ours out of its way.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('DPS_')));
  env.NO_COLOR = '1'; // plain log lines in the log file
  const child = spawn(serverBinary(), ['run', '--config', configPath], { stdio: ['ignore', logFd, logFd], env });
  fs.closeSync(logFd);
  let exited = null;
  child.on('exit', (code, signal) => {
    exited = { code, signal };
  });
  const server = { ip, dataDir, configPath, logPath, child, exitInfo: () => exited };
  const readyFile = path.join(dataDir, 'ready.json');
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (exited) {
      const message = `dps-server exited (${JSON.stringify(exited)}) before it was ready; log:\n${tail(logPath)}`;
      cleanup(server);
      throw new Error(message);
    }
    if (fs.existsSync(readyFile)) {
      try {
        server.ready = JSON.parse(fs.readFileSync(readyFile, 'utf8'));
        break;
      } catch (e) {
        // being written; read again
      }
    }
    if (Date.now() > deadline) {
      await stopServer(server);
      const message = `dps-server not ready after ${READY_TIMEOUT_MS} ms; log:\n${tail(logPath)}`;
      cleanup(server);
      throw new Error(message);
    }
    await sleep(50);
  }
  server.caPath = path.join(dataDir, 'tls', 'ca.pem');
  server.connectionString = fs.readFileSync(path.join(dataDir, 'connection-string.txt'), 'utf8').trim();
  return server;
}

// SIGTERM, bounded wait, then SIGKILL. Resolves to { code, signal }.
async function stopServer(server) {
  if (!server.exitInfo()) {
    server.child.kill('SIGTERM');
    const deadline = Date.now() + STOP_TIMEOUT_MS;
    while (!server.exitInfo() && Date.now() < deadline) await sleep(50);
    if (!server.exitInfo()) {
      log(`dps-server did not stop ${STOP_TIMEOUT_MS} ms after SIGTERM; killing it`);
      server.child.kill('SIGKILL');
      while (!server.exitInfo()) await sleep(50);
    }
  }
  return server.exitInfo();
}

function cleanup(server) {
  if (process.env.DPS_CONFORMANCE_KEEP) {
    log(`keeping ${server.dataDir} and ${server.logPath}`);
    return;
  }
  fs.rmSync(server.dataDir, { recursive: true, force: true });
  fs.rmSync(server.configPath, { force: true });
  fs.rmSync(server.logPath, { force: true });
}

// In the parent: start the server, run this file again as a child with NODE_EXTRA_CA_CERTS, stop the server,
// exit with the child's status, and return true (the caller must then return). In the child: return false.
function wrapTestFile(filename, ip) {
  const inherited = process.env[CHILD_ENV];
  if (inherited && JSON.parse(inherited).file === filename) return false;
  (async () => {
    let server;
    try {
      server = await startServer(ip);
    } catch (e) {
      log(`${path.basename(filename)}: ${e.message}`);
      process.exitCode = 1;
      return;
    }
    const info = {
      file: filename,
      ip,
      idScope: ID_SCOPE,
      dataDir: server.dataDir,
      caPath: server.caPath,
      connectionString: server.connectionString,
      logPath: server.logPath,
      ready: server.ready,
    };
    const env = { ...process.env, NODE_EXTRA_CA_CERTS: server.caPath, [CHILD_ENV]: JSON.stringify(info) };
    const child = spawn(process.execPath, [...process.execArgv, filename], { stdio: 'inherit', env });
    const forward = (signal) => child.kill(signal);
    process.on('SIGINT', forward);
    process.on('SIGTERM', forward);
    const [code, signal] = await new Promise((resolve) => child.on('exit', (c, s) => resolve([c, s])));
    const stopped = await stopServer(server);
    let status = code === null ? 1 : code;
    if (signal) log(`${path.basename(filename)}: test process killed by ${signal}`);
    // The server contract: SIGTERM stops it gracefully, i.e. with exit status 0.
    if (stopped.code !== 0) {
      log(`${path.basename(filename)}: dps-server exited with ${JSON.stringify(stopped)} after SIGTERM; log:\n` +
        tail(server.logPath));
      status = status || 1;
    } else if (status !== 0) {
      log(`${path.basename(filename)}: tests failed; last lines of the dps-server log:\n${tail(server.logPath, 30)}`);
    }
    cleanup(server);
    process.exitCode = status;
  })();
  return true;
}

// The running server, as seen by the child.
function server() {
  const info = JSON.parse(process.env[CHILD_ENV] || 'null');
  if (!info) throw new Error('harness.server() outside a wrapped test file');
  return info;
}

function randomKey(bytes = 64) {
  return crypto.randomBytes(bytes).toString('base64');
}

// Per-device key of a symmetric-key group: base64(HMAC-SHA256(b64decode(groupKey), regId)) (spec 4.3).
function deriveDeviceKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64')).update(registrationId, 'utf8').digest('base64');
}

function uniqueId(prefix) {
  return `${prefix}-${crypto.randomBytes(4).toString('hex')}`;
}

// X.509 certificates from conformance/pki.py, run with the Python suite's venv interpreter (where `cryptography`
// is installed; `DPS_CONFORMANCE_PYTHON` overrides). Every method writes `<name>.key.pem`, `<name>.pem` and
// `<name>.chain.pem` (certificate + intermediates, what a device sends) into the directory and returns pki.py's
// description ({ name, cn, issuer, key, cert, chain, sha1Thumbprint, sha256Thumbprint, serialNumber, notBeforeUtc,
// notAfterUtc }: file paths and facts) plus the PEM texts { keyPem, certPem, chainPem } and { prefix } (what
// `--ca` takes). Options: { key: 'ec' | 'rsa', name, expired }.
const PKI_PYTHON = process.env.DPS_CONFORMANCE_PYTHON ||
  path.join(REPO_ROOT, 'conformance', 'python', '.venv', 'bin', 'python');
const PKI_SCRIPT = path.join(REPO_ROOT, 'conformance', 'pki.py');

class Pki {
  constructor(dir) {
    this.dir = dir || fs.mkdtempSync(path.join(os.tmpdir(), 'dps-conformance-node-pki-'));
  }

  run(args, options = {}) {
    const full = [PKI_SCRIPT, ...args, '--out', this.dir];
    if (options.key) full.push('--key', options.key);
    if (options.name) full.push('--name', options.name);
    if (options.expired) full.push('--expired');
    let out;
    try {
      out = execFileSync(PKI_PYTHON, full, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      throw new Error(`${PKI_PYTHON} ${full.join(' ')} failed: ${e.stderr || e.message}`);
    }
    const made = JSON.parse(out);
    made.prefix = path.join(path.dirname(made.cert), made.name);
    made.keyPem = fs.readFileSync(made.key, 'utf8');
    made.certPem = fs.readFileSync(made.cert, 'utf8');
    made.chainPem = fs.readFileSync(made.chain, 'utf8');
    return made;
  }

  root(name, options) {
    return this.run(['root', '--name', name], options);
  }

  intermediate(ca, name, options) {
    return this.run(['intermediate', '--ca', ca.prefix, '--name', name], options);
  }

  device(ca, cn, options) {
    return this.run(['device', '--ca', ca.prefix, '--cn', cn], options);
  }

  selfSigned(cn, options) {
    return this.run(['self-signed', '--cn', cn], options);
  }

  proof(ca, code, options) {
    return this.run(['proof', '--ca', ca.prefix, '--code', code], { name: 'proof', ...options });
  }

  cleanup() {
    if (process.env.DPS_CONFORMANCE_KEEP) {
      log(`keeping ${this.dir}`);
      return;
    }
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

module.exports = {
  ID_SCOPE,
  HUB_A,
  HUB_B,
  LINKED_HUBS,
  wrapTestFile,
  server,
  randomKey,
  deriveDeviceKey,
  uniqueId,
  Pki,
};
